"""What each DDP rank did when, for `bench/full_scale_rehearsal.py`: a callback that appends one JSON line per
event to ``<out>/rank<k>.jsonl`` with wall time, this process's CPU time and its peak resident memory.

Events: the Lightning hooks that bound training epochs, validations and tests, and every log record of irlab's
own loggers (the passes outside Lightning's loops announce themselves there: codebook fits, identifiers). CPU
time tells work from waiting: a rank blocked in a collective uses (almost) none.

    python train.py ... +callbacks.rehearsal_probe._target_=bench.rehearsal_probe.StageProbe \\
        +callbacks.rehearsal_probe.out=/tmp/probe
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

LOGGERS = ("irgen", "irlab", "areir")


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


class _Recorder(logging.Handler):
    def __init__(self, probe: StageProbe) -> None:
        super().__init__(logging.INFO)
        self.probe = probe

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(LOGGERS):
            self.probe.event("log", record.getMessage()[:160])


class StageProbe(Callback):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = "?"
        self._handler = _Recorder(self)
        logging.getLogger().addHandler(self._handler)
        self.event("start", "process")

    def event(self, kind: str, what: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        line = {"t": time.time(), "cpu": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
                "rank": _rank(), "model": self.model, "kind": kind, "what": what}
        with open(self.out / f"rank{_rank()}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.model = type(pl_module).__name__
        self.event("hook", f"setup {stage}")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.event("hook", "train epoch start")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.event("hook", "train epoch end")

    def on_validation_start(self, trainer, pl_module) -> None:
        self.event("hook", "validation start")

    def on_validation_end(self, trainer, pl_module) -> None:
        self.event("hook", "validation end")

    def on_test_start(self, trainer, pl_module) -> None:
        self.event("hook", "test start")

    def on_test_end(self, trainer, pl_module) -> None:
        self.event("hook", "test end")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.event("hook", f"teardown {stage}")
