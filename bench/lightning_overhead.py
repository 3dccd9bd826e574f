"""Lightning overhead: training images/s of a LightningModule under `Trainer.fit` vs a plain PyTorch loop.

Both run the same model (`training_step`), the module's own optimizer (no scheduler in the plain loop) and the
same batches, one after the other in one process, so the ratio isolates what the Trainer adds (hooks,
logging, progress bar).

    python bench/lightning_overhead.py                       # baseline on the embedded digits, CPU
    python bench/lightning_overhead.py --model areir --steps 30
    python bench/lightning_overhead.py --model irgen_generator --device cuda --bf16    # on a GPU machine
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from datamodules.digits import DigitsDataModule  # noqa: E402


def build_model(name: str, dm: DigitsDataModule) -> L.LightningModule:
    from irlab.optim import preset

    num_classes = dm.num_classes
    if name == "baseline":
        from irlab.baseline import EmbeddingBaseline

        return EmbeddingBaseline(num_classes=num_classes, arch="resnet18", embedding_dim=64,
                                 optimizer=preset("optimizer", "adamw", lr=2e-3, weight_decay=1e-4))
    if name == "areir":
        from areir.module import AREIRModule

        return AREIRModule(num_classes=num_classes, arch="resnet18", members=8, meta_classes=3,
                           optimizer=preset("optimizer", "adam"))
    if name == "irgen_tokenizer":
        from irgen.tokenizer import IRGenTokenizer

        model = IRGenTokenizer(num_classes=num_classes, encoder={"arch": "vit_tiny", "image_size": 32},
                               num_levels=4, num_codes=16, optimizer=preset("optimizer", "adamw"))
        # codebooks from k-means on random features: the timed steps then cost what they cost in training
        model.refit_codebooks(torch.randn(512, model.quantizer.codebooks.shape[-1]))
        return model
    if name == "irgen_generator":
        from irgen.generator import IRGenGenerator

        model = IRGenGenerator(code_depth=4, codebook_size=16, encoder={"arch": "vit_tiny", "image_size": 32},
                               width=128, layers=2, heads=4, encoder_lr_scale=0.01,
                               optimizer=preset("optimizer", "adamw", lr=1e-4, weight_decay=0.05))
        # random identifiers stand in for a tokenizer artifact: the step costs the same for any codes
        codes = torch.randint(0, 16, (len(dm.records), 4), generator=torch.Generator().manual_seed(0))
        model.set_identifiers(codes)
        # what on_train_epoch_start draws through the trainer; the plain loop has no trainer
        model._targets = codes[torch.from_numpy(dm.split.train_ids)]
        return model
    raise ValueError(f"unknown model {name!r}")


class StopAfter(L.Callback):
    """Times the steps after `warmup` (which build caches), up to the end of the last batch (epoch-end work,
    such as the tokenizer's codebook re-fit, is not a per-step cost and stays outside)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start, self.elapsed = warmup, 0, None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += len(batch["image"])
            self.elapsed = time.perf_counter() - self.start


def lightning_images_per_second(model, dm, steps: int, warmup: int, device: str, bf16: bool) -> float:
    timer = StopAfter(warmup)
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if bf16 else "32-true", max_epochs=1,
                        limit_train_batches=steps + warmup, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=True, callbacks=[timer],
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    return timer.images / timer.elapsed


def module_optimizer(model: L.LightningModule) -> torch.optim.Optimizer:
    """The module's own optimizer (same step cost as under Lightning), built with a detached bare Trainer for
    the schedule lengths it reads; AdamW when the module needs more trainer state than that."""
    try:
        model.trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                                  enable_progress_bar=False, enable_model_summary=False)
        conf = model.configure_optimizers()
    except Exception as exc:  # noqa: BLE001 - any trainer state it needs means: fall back
        print(f"  (plain loop: AdamW, the module's configure_optimizers needs a fitted trainer: {exc})")
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    finally:
        model.trainer = None
    optimizer = conf["optimizer"] if isinstance(conf, dict) else conf
    return optimizer[0] if isinstance(optimizer, list | tuple) else optimizer


def plain_images_per_second(model, dm, steps: int, warmup: int, device: str, bf16: bool) -> float:
    # configure_optimizers may read trainer state (schedules); an Adam-family step costs the same either way
    model.to(device)
    if getattr(model, "_targets", None) is not None:
        model._targets = model._targets.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    images, start = 0, None
    for i, batch in enumerate(dm.train_dataloader()):
        if i == warmup:
            start = time.perf_counter()
        if i >= steps + warmup:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model.training_step(batch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            images += len(batch["image"])
    if device == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="baseline",
                        choices=["baseline", "areir", "irgen_tokenizer", "irgen_generator"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast / Lightning bf16-mixed (GPU)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: stable on a shared machine; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dm = DigitsDataModule(batch_size=args.batch_size)
    dm.setup()
    results = {}
    runners = (("plain PyTorch loop", plain_images_per_second), ("Lightning Trainer.fit", lightning_images_per_second))
    for name, fn in runners:
        L.seed_everything(0, verbose=False)
        # the plain loop has no trainer: silence self.log() calls that only a Trainer can record
        model = build_model(args.model, dm)
        model.log = lambda *a, **k: None
        results[name] = fn(model, dm, args.steps, args.warmup, args.device, args.bf16)
    plain, lightning = results["plain PyTorch loop"], results["Lightning Trainer.fit"]
    print(f"\nmodel={args.model} device={args.device} bf16={args.bf16} batch={args.batch_size} steps={args.steps} "
          f"threads={torch.get_num_threads()}")
    for name, value in results.items():
        print(f"  {name:<24} {value:8.1f} images/s")
    print(f"  Lightning / plain ratio  {lightning / plain:8.3f}  (overhead {100 * (1 - lightning / plain):+.1f}%)")


if __name__ == "__main__":
    main()
