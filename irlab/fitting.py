"""``trainer.fit`` for every method and stage: a SIGTERM (a scheduler's pre-emption) ends the run with exit code
143 and the command that resumes it."""

from __future__ import annotations

import logging
import warnings

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)
SIGTERM_EXIT = 143  # 128 + SIGTERM: what schedulers expect from a job that was terminated
# Lightning 2.6 says these on every fresh fit(ckpt_path=None): irlab chooses what to resume from explicitly
# (ckpt_path=last / on_exception, IRGen stage folders), so for a fresh run they are wrong and only confuse
warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=None\)` was called without a model")
warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint")


def fit_or_exit(trainer: L.Trainer, resume: str, *args, **kwargs) -> None:
    """``trainer.fit`` that turns SIGTERM into exit code 143 with the command that resumes (`resume`), instead
    of a bare traceback (or an exit code 0, when Lightning swallowed it), so that a scheduler records a failure
    and the user knows what to type. Lightning has saved ``on_exception.ckpt`` by then."""
    try:
        trainer.fit(*args, **kwargs)
    except SIGTERMException:
        pass
    else:
        if not trainer.received_sigterm:
            return
    log.error(f"received SIGTERM: training stopped and its state was saved. Resume with:\n  {resume}")
    raise SystemExit(SIGTERM_EXIT)
