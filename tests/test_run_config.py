"""`eval.py ckpt_path=X` alone: which overrides the run that wrote X recorded."""

from omegaconf import OmegaConf

from irlab.run_config import RUN_OVERRIDES, checkpoint_run_overrides


def test_run_folder_checkpoint_reads_its_hydra_record(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.create(["model.embedding_dim=48", "hydra.run.dir=/x", "ckpt_path=last", "seed=3"]),
                   run / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": {"experiment": "digits_baseline"}}}}),
                   run / ".hydra" / "hydra.yaml")
    ckpt = run / "checkpoints" / "epoch_003.ckpt"
    assert checkpoint_run_overrides(ckpt) == ["experiment=digits_baseline", "model.embedding_dim=48", "seed=3"]


def test_stage_folder_checkpoint_reads_the_file_beside_it(tmp_path):
    OmegaConf.save(OmegaConf.create(["experiment=digits_irgen", "seed=2", "irgen.stage=generator"]),
                   tmp_path / RUN_OVERRIDES)
    assert checkpoint_run_overrides(tmp_path / "epoch_019.ckpt") == ["experiment=digits_irgen", "seed=2"]
    assert checkpoint_run_overrides(tmp_path / "elsewhere" / "x.ckpt") is None
