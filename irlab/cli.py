"""Checks that must run before Hydra parses the command line (its own errors would not say what to install)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from datamodules.errors import UserInputError

# command-line prefix -> (plugin module, pyproject extra)
OPTIONAL_PLUGINS = {
    "hparams_search=": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (hydra_plugins) is missing too
        return False


def require_plugins(argv: list[str]) -> None:
    """Exit with the install command when the command line asks for a Hydra plugin that is not installed."""
    for prefix, (module, extra) in OPTIONAL_PLUGINS.items():
        if any(arg.startswith(prefix) for arg in argv) and not _installed(module):
            sys.exit(f"`{prefix}...` needs a Hydra plugin that is not installed ({module}). Install it with:\n"
                     f'  pip install -e ".[{extra}]"')


@contextmanager
def user_errors_as_messages() -> Iterator[None]:
    """An error in the user's input (`datamodules.errors.UserInputError`: a missing or wrong file, a stale
    artifact, a dataset in another layout) ends the run with its message alone and exit code 1; with
    ``HYDRA_FULL_ERROR=1`` it propagates with its traceback. Other exceptions are bugs and keep theirs."""
    try:
        yield
    except UserInputError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {exc}")
