"""`python eval.py ckpt_path=<checkpoint>` with nothing else: the config of the run that wrote the checkpoint.

A checkpoint in ``<run>/checkpoints/`` finds its run's Hydra record (``<run>/.hydra/overrides.yaml`` and the
experiment chosen in ``<run>/.hydra/hydra.yaml``); a checkpoint in a folder of its own (an IRGen stage folder)
finds ``run_overrides.yaml`` beside it, written by the stage. `eval.py` composes its config again from those
overrides followed by the ones typed now (which therefore win), so the method, dataset, protocol and model are
the training run's without being retyped.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

RUN_OVERRIDES = "run_overrides.yaml"
# training-only overrides that mean nothing (or something else) to an evaluation
DROPPED = ("hydra.", "ckpt_path=", "irgen.stage=", "irgen.rebuild=", "+hydra")


def _hydra_config():
    """This process's Hydra run config, or None outside a Hydra run (direct API use)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except (ImportError, ValueError):
        return None


def current_run_overrides() -> list[str]:
    """This Hydra run's experiment choice and command-line overrides ([] outside a Hydra run)."""
    hc = _hydra_config()
    if hc is None:
        return []
    task = list(hc.overrides.task)
    experiment = hc.runtime.choices.get("experiment")
    chosen = [f"experiment={experiment}"] if experiment and not any(o.startswith("experiment=") for o in task) else []
    return chosen + task


# a command that reruns this run must not carry its checkpoint or its run folders
NOT_REPEATED = ("ckpt_path=", "hydra.run.dir=", "hydra.sweep.")


def this_command(*extra: str, drop: tuple[str, ...] = ()) -> str:
    """The command line of this run: its script, experiment and overrides, minus `NOT_REPEATED` and overrides
    starting with one of `drop`, followed by `extra` (the resume and rebuild hints of every method)."""
    hc = _hydra_config()
    script = "eval.py" if hc is not None and hc.job.config_name == "eval" else "train.py"
    kept = [o for o in current_run_overrides() if not o.startswith(NOT_REPEATED + tuple(drop))]
    return " ".join(["python", script, *kept, *extra])


def write_run_overrides(folder: Path) -> None:
    """Record this run's overrides in `folder` (a stage folder whose checkpoints eval.py may be given alone)."""
    overrides = current_run_overrides()
    if overrides:
        Path(folder).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(overrides), Path(folder) / RUN_OVERRIDES)


def checkpoint_run_overrides(ckpt: str | Path) -> list[str] | None:
    """The overrides of the run that wrote `ckpt` (training-only ones dropped), or None when none are recorded."""
    ckpt = Path(ckpt).expanduser()
    beside = ckpt.parent / RUN_OVERRIDES
    hydra_dir = ckpt.parent.parent / ".hydra"
    if beside.is_file():
        overrides = list(OmegaConf.load(beside))
    elif (hydra_dir / "overrides.yaml").is_file():
        overrides = list(OmegaConf.load(hydra_dir / "overrides.yaml"))
        hydra_yaml = hydra_dir / "hydra.yaml"
        experiment = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices.experiment") \
            if hydra_yaml.is_file() else None
        if experiment and not any(o.startswith("experiment=") for o in overrides):
            overrides.insert(0, f"experiment={experiment}")
    else:
        return None
    return [str(o) for o in overrides if not str(o).startswith(DROPPED)]


# typed overrides that choose the model or data themselves: the user said what to evaluate it as
CHOOSES = ("experiment=", "model=", "dataset=", "method=", "protocol=")


def with_checkpoint_run_config(cfg, config_name: str = "eval"):
    """`cfg`, or -- when ``ckpt_path`` names a checkpoint whose run is recorded and the command line chose no
    experiment/model/dataset itself -- the config composed from that run's overrides plus the typed ones."""
    import logging

    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from datamodules.paths import expand_path

    ckpt = None if OmegaConf.is_missing(cfg, "ckpt_path") else cfg.get("ckpt_path")
    typed = list(HydraConfig.get().overrides.task)
    if not ckpt or any(o.startswith(CHOOSES) for o in typed) or not expand_path(str(ckpt)).is_file():
        return cfg
    saved = checkpoint_run_overrides(expand_path(str(ckpt)))
    if not saved:
        return cfg
    logging.getLogger(__name__).info(f"evaluating with the overrides of the run that wrote {ckpt}: {saved}")
    given = [] if any(o.startswith("ckpt_path=") for o in typed) else [f"ckpt_path={ckpt}"]  # from an index
    return compose(config_name=config_name, overrides=[*saved, *typed, *given])


def with_index_checkpoint(cfg):
    """``index=<dir>`` without ``ckpt_path``: the checkpoint named by the index's manifest."""
    from omegaconf import OmegaConf, open_dict

    if not cfg.get("index") or not OmegaConf.is_missing(cfg, "ckpt_path"):
        return cfg
    from irlab.saved_index import read_manifest

    with open_dict(cfg):
        cfg.ckpt_path = read_manifest(cfg.index)["checkpoint"]
    return cfg
