"""Training images/s and peak memory of the reference-size models on one device (a step of `gpu_check.sh`).

    python bench/gpu_throughput.py --model baseline --device cuda --bf16            # ResNet-50 at 224 px, batch 64
    python bench/gpu_throughput.py --model irgen_generator --device cuda --bf16 --compile
    python bench/gpu_throughput.py --model irgen_generator --toy                    # CPU, seconds (the dry run)

* ``baseline``: ResNet-50 trunk + 512-d embedding + normalized softmax, 224 px (public anchor: about 2.5k img/s on
  an A100 with AMP for a plain ResNet-50 training step).
* ``irgen_generator``: the paper's generator, ViT-B/16 encoder (fine-tuned) + 768-wide 12-layer decoder over
  4 x 256 identifiers, 224 px, batch 64.
``--toy`` shrinks every size so that the same code runs on a CPU in seconds. Synthetic images: this measures the
model step (forward, backward, AdamW), not data loading (`bench/data_loading.py` does that).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing


def build(name: str, toy: bool) -> tuple[torch.nn.Module, int, int, callable]:
    """(model, image size, batch, loss(model, images) -> scalar)."""
    if name == "baseline":
        from irlab.baseline import EmbeddingBaseline

        model = EmbeddingBaseline(num_classes=100, arch="resnet18" if toy else "resnet50", embedding_dim=512)
        labels = torch.arange(64) % 100

        def loss(m, images):
            return m.loss(m.embed(images), labels[: len(images)].to(images.device))

        return model, 32 if toy else 224, 4 if toy else 64, loss
    if name == "irgen_generator":
        from irgen.generator import IRGenGenerator

        encoder = {"arch": "vit_tiny", "image_size": 32} if toy else {"arch": "vit_b_16", "image_size": 224}
        width, layers, heads = (32, 1, 2) if toy else (768, 12, 12)
        model = IRGenGenerator(code_depth=4, codebook_size=256, encoder=encoder, encoder_init=None, width=width,
                               layers=layers, heads=heads, encoder_lr_scale=0.01)

        def loss(m, images):
            targets = torch.randint(0, 256, (len(images), 4), device=images.device)
            logits = m.teacher_forced_logits(m.encoder(images), targets)
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

        return model, 32 if toy else 224, 4 if toy else 64, loss
    raise ValueError(f"unknown model {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["baseline", "irgen_generator"], default="baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step's model")
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CPU dry run)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, size, batch, loss_fn = build(args.model, args.toy)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_model = torch.compile(model) if args.compile else model
    images = torch.randn(batch, 3, size, size, device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with autocast():
                loss = loss_fn(step_model, images)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch * steps / (time.perf_counter() - start)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(2)  # warm-up (and compilation)
    rates = [run(args.steps) for _ in range(args.rounds)]
    peak = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"{args.model}: {size} px, batch {batch}, {'bf16' if args.bf16 else 'fp32'}"
          f"{', compiled' if args.compile else ''} on {device}: images/s median {statistics.median(rates):.1f}, "
          f"max {max(rates):.1f} over {args.rounds} x {args.steps} steps{peak}")


if __name__ == "__main__":
    main()
