"""Errors in what a user gave a run (a file, a key, a dataset, a stale artifact): `train.py` and `eval.py` print
their message alone, with no traceback (``HYDRA_FULL_ERROR=1`` shows it); every other exception is irlab's own
bug and keeps its traceback. Defined in the data layer, the lowest one, so that every layer can raise them."""

from __future__ import annotations


class UserInputError(Exception):
    """Base of every error whose message names the file or key at fault and the fix."""


class MissingFileError(UserInputError, FileNotFoundError):
    """A file or folder the run was told to read does not exist."""
