"""What `train.py`, `eval.py`, `index.py` and `export.py` run, from start to end, for every method: the run is
seeded, its datamodule built and its result written (``metrics.json``) and printed here, once; in between the
method (`irlab.methods`, chosen by ``method.name``) trains or evaluates, `irlab.query` ranks a gallery for
query images (in memory, or a saved index), or the trained model is saved as an index (`irlab.saved_index`) or
an export (`irlab.export`). A train action always calls the method's ``train`` and an evaluate action its
``evaluate``, so an experiment cannot turn an evaluation into a training run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from datamodules.errors import UserInputError
from irlab.builders import build_datamodule
from irlab.export import export_model
from irlab.method import RunReport
from irlab.methods import method_named
from irlab.provenance import run_provenance, start_clock
from irlab.query import query_checkpoint, query_saved_index
from irlab.reporting import print_metrics, write_metrics
from irlab.run_config import with_index_checkpoint
from irlab.saved_index import build_saved_index
from irlab.serve import serve_index

log = logging.getLogger(__name__)
ACTIONS = ("train", "evaluate", "index", "export", "serve")


def run(cfg: DictConfig, action: str = "train") -> dict[str, float]:
    """Seed, build the datamodule, run the method's ``train`` or ``evaluate`` (or the query path, for
    ``evaluate`` with ``query=``), then write and print its report on global rank 0; the metrics."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    start_clock()
    if cfg.torch_threads:  # conf/train.yaml, conf/eval.yaml
        torch.set_num_threads(int(cfg.torch_threads))
    output_dir = Path(cfg.paths.output_dir)
    log.info(f"run folder: {output_dir}")
    cfg = with_index_checkpoint(cfg)  # index=<dir> without ckpt_path: the index's checkpoint
    if action != "train" and OmegaConf.is_missing(cfg, "ckpt_path"):
        script = {"evaluate": "eval"}.get(action, action)
        alternative = " (or index=<dir> of a saved index)" if action in ("evaluate", "serve") else ""
        raise UserInputError(f"ckpt_path is required: python {script}.py ckpt_path=<run>/checkpoints/epoch_XXX.ckpt"
                             f"{alternative}")
    method = method_named(cfg.method.name)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    log.info(f"data: {datamodule.describe()}")
    if action == "serve":  # serve.py: until interrupted
        serve_index(cfg, datamodule, method.load)
        return {}
    if action in ("index", "export"):  # index.py, export.py: the method's trained model, saved for use elsewhere
        model, ckpt = method.load(cfg, datamodule)
        save = build_saved_index if action == "index" else export_model
        print(f"{action}: {save(cfg, datamodule, model, ckpt)}", flush=True)
        metrics = {}
    elif action == "evaluate" and cfg.query:  # conf/eval.yaml
        metrics = query_saved_index(cfg, datamodule, method.load) if cfg.index else \
            query_checkpoint(cfg, datamodule, method.load)
    else:
        if action == "train" and datamodule.split.val_is_test:
            log.warning("no validation split (dataset.val_fraction=0): validation reports the TEST set, so "
                        "checkpoint selection sees test labels. Set dataset.val_fraction for honest model selection.")
        step = method.train if action == "train" else method.evaluate
        report = step(cfg, datamodule)
        if rank_zero_only.rank == 0:
            write_report(report, cfg, datamodule, output_dir)
        metrics = report.metrics
    if rank_zero_only.rank == 0:
        print(f"run folder: {output_dir}", flush=True)  # metrics.json, checkpoints, figures
    return metrics


def write_report(report: RunReport, cfg: DictConfig, datamodule, output_dir: Path) -> None:
    """``metrics.json`` (metrics, what they were measured on, the run's provenance) and the printed tables."""
    data = {**datamodule.describe(), **report.data}
    write_metrics(output_dir / "metrics.json", report.metrics, data, report.row_names,
                  provenance=run_provenance(cfg, datamodule))
    print_metrics(report.metrics, title=f"{report.title}: {datamodule.name} / {datamodule.protocol}",
                  row_names=report.row_names)
