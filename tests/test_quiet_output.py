"""A Trainer built the way irlab builds them says nothing that means nothing to an irlab user."""

from __future__ import annotations

import logging

import lightning as L

from irlab.quiet_output import quiet_lightning


def test_lightning_noise_is_dropped_and_the_rest_kept(caplog):
    quiet_lightning()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        L.Trainer(logger=False, accelerator="cpu", limit_train_batches=1.0, limit_val_batches=1.0,
                  enable_progress_bar=False, enable_model_summary=False)
    assert "Tip" not in caplog.text and "100% of the batches" not in caplog.text
    assert "GPU available" in caplog.text  # other information still gets through


def test_the_model_summary_has_no_flops_column_without_an_example_input(tmp_path, capsys):
    import torch

    from callbacks.model_summary import ModelSummaryTable

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

    ModelSummaryTable().on_fit_start(L.Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu",
                                               enable_progress_bar=False), Tiny())
    out = capsys.readouterr().out
    assert "layer" in out and "Linear" in out and "Total params" in out
    assert "FLOPs" not in out
