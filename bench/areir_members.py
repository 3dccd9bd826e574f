"""Forward+backward time of each AREIR member formulation (loop / grouped / vmap), side by side.

    python bench/areir_members.py                                   # CPU: E=8, 64 px, batch 8, resnet18
    python bench/areir_members.py --members 48 --size 256 --batch 12 --device cuda --bf16 --channels-last

All formulations share one set of weights (the stacked layout of `areir.model`), so the outputs are also compared:
the printed max |diff| vs the loop must be at float rounding level. "saved MiB" is the activation memory autograd
keeps for backward (measured on any device; it scales linearly in members x batch); on GPU the peak is printed too.
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
from areir.model import MEMBER_IMPLS, AREIRNet, AREIRNetConfig  # noqa: E402
from irlab.memory import saved_activation_bytes  # noqa: E402


def step(model: AREIRNet, images: torch.Tensor, labels: torch.Tensor, bf16: bool) -> torch.Tensor:
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        logits = model(images)
        targets = labels.repeat_interleave(logits.shape[1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets)
    loss.backward()
    return logits.detach().float()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--meta-classes", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=2, help="steps per timed sample")
    parser.add_argument("--rounds", type=int, default=5, help="timed samples per formulation (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU mixed precision)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing (loop/grouped)")
    parser.add_argument("--no-se", action="store_true")
    parser.add_argument("--member-width", type=int, default=None, help="cnn_small members' channels (default 128)")
    parser.add_argument("--impls", default=",".join(MEMBER_IMPLS))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = AREIRNetConfig(args.arch, args.members, args.meta_classes, not args.no_se, member_width=args.member_width)
    model = AREIRNet(config).to(device).train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, args.meta_classes, (args.batch,), device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # timing steps train; outputs use these weights

    print(f"{args.arch} E={args.members} width={args.member_width or 'default'} M={args.meta_classes} "
          f"{args.size}px batch={args.batch} device={device} "
          f"bf16={args.bf16} channels_last={args.channels_last} checkpoint={args.checkpoint} "
          f"threads={torch.get_num_threads()}")
    impls = [i for i in args.impls.split(",") if not (i == "vmap" and args.checkpoint)]
    times: dict[str, list[float]] = {i: [] for i in impls}
    peaks: dict[str, float] = {}
    # Rounds interleave the formulations and the minimum per formulation is reported: on a shared machine a
    # neighbour's burst then inflates single samples instead of whichever formulation happened to run during it.
    for round_ in range(args.warmup + args.rounds):
        for impl in impls:
            model.member_impl, model.checkpoint_members = impl, args.checkpoint
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            for _ in range(args.iters):
                model.zero_grad(set_to_none=True)
                step(model, images, labels, args.bf16)
            sync(device)
            if round_ >= args.warmup:
                times[impl].append((time.perf_counter() - start) / args.iters * 1e3)
            peaks[impl] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")

    print(f"{'impl':<9}{'min ms':>10}{'median ms':>11}{'vs loop':>9}{'max|diff|':>11}{'saved MiB':>11}{'peak MiB':>10}")
    outputs: dict[str, torch.Tensor] = {}
    for impl in impls:
        model.load_state_dict(state)
        model.member_impl, model.checkpoint_members = impl, args.checkpoint
        saved = saved_activation_bytes(lambda: model(images), model, args.bf16, device.type) / 2**20
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            outputs[impl] = model(images).float()
        model.train()
        best, median = min(times[impl]), statistics.median(times[impl])
        base = min(times["loop"]) if "loop" in times else best
        diff = (outputs[impl] - outputs.get("loop", outputs[impl])).abs().max().item()
        print(f"{impl:<9}{best:>10.1f}{median:>11.1f}{base / best:>8.2f}x{diff:>11.2e}{saved:>11.0f}"
              f"{peaks[impl]:>10.0f}")


if __name__ == "__main__":
    main()
