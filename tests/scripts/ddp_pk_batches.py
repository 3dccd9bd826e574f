"""P x K batches under Lightning DDP, run as a subprocess by tests/test_samplers.py (Lightning re-executes the
script for rank 1). Two gloo ranks train a linear probe for two epochs on closed-set digits with
``sampler="pk"``; every rank writes the dataset positions and labels of each batch it trained on to
``<out>/rank<k>.json``. Usage: ``python tests/scripts/ddp_pk_batches.py <out folder>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules.digits import DigitsDataModule  # noqa: E402


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.probe = torch.nn.Linear(3 * 8 * 8, 2)
        self.seen: list[dict] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append({"epoch": self.current_epoch, "step": batch_idx, "index": batch["index"].tolist(),
                          "label": batch["label"].tolist()})
        return self.probe(batch["image"].flatten(1).float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main(out: Path) -> None:
    dm = DigitsDataModule(protocol="closed_set", image_size=8, resize_size=8, batch_size=8, sampler="pk",
                          samples_per_class=2, seed=3)
    model = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=3,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(model.seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
