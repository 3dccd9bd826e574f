"""Predicted peak training memory of the reference settings, before a GPU is there to measure it.

    python bench/memory_estimate.py           # AREIR E=48 (resnet18, resnet50), IRGen generator at paper size
    python bench/memory_estimate.py --toy     # the same arithmetic at toy sizes (seconds; the GPU check's dry run)

Model, per setting (bf16-mixed, Adam-family optimizer):
* parameter state: exact parameter counts (built on the meta device) x 16 bytes (fp32 weight, gradient and two
  Adam moments) + 2 bytes per parameter for the bf16 copies autocast keeps during the forward;
* activations: what autograd keeps for backward (`irlab.memory.saved_activation_bytes`), MEASURED here on the CPU
  under bf16 autocast at small sizes and extrapolated: AREIR linearly in members (two member counts give the
  stem and per-member parts), in pixels (two image sizes, checked to scale linearly) and in batch; the
  generator linearly in batch (its token count is fixed by the image size, measured at full size);
* with member checkpointing, the kept activations are the segments' inputs (measured the same way) plus one
  recomputed member's activations during backward (the per-member slope: the loop formulation's peak; grouped
  checkpointing recomputes one block of all members, reported as the upper line).
Not modelled: allocator fragmentation and cuDNN/cuBLAS workspaces (typically 5-15%): the GPU check's measured
peak (`torch.cuda.max_memory_allocated`) is the number to trust; this prints the prediction to check it against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from areir.model import AREIRNet, AREIRNetConfig  # noqa: E402
from irlab.memory import (  # noqa: E402
    AUTOCAST_COPY_BYTES_PER_PARAM,
    STATE_BYTES_PER_PARAM,
    parameter_count,
    saved_activation_bytes,
)

GiB = 2**30


def areir_saved(arch: str, members: int, size: int, batch: int, checkpoint: bool) -> int:
    torch.manual_seed(0)
    model = AREIRNet(AREIRNetConfig(arch, members, 12, True, False, "loop", checkpoint_members=checkpoint)).train()
    images = torch.randn(batch, 3, size, size)
    return saved_activation_bytes(lambda: model(images), model, bf16=True)


def areir_activations(arch: str, members: int, size: int, batch: int, checkpoint: bool, probe: dict
                      ) -> tuple[float, float, str]:
    """(kept activations, one member's uncheckpointed activations) at the target size, from probes at two member
    counts and two image sizes: affine in pixels (fixed-size parts such as the logits exist), linear in members,
    proportional to batch."""
    (e1, e2), (s1, s2), b = probe["members"], probe["sizes"], probe["batch"]

    def at_target(e: int, ckpt: bool) -> float:
        small, large = areir_saved(arch, e, s1, b, ckpt), areir_saved(arch, e, s2, b, ckpt)
        per_pixel = (large - small) / (s2**2 - s1**2)
        return (small + per_pixel * (size**2 - s1**2)) * batch / b

    kept = {e: at_target(e, checkpoint) for e in (e1, e2)}
    plain = kept if not checkpoint else {e: at_target(e, False) for e in (e1, e2)}
    per_member = (kept[e2] - kept[e1]) / (e2 - e1)
    member_full = (plain[e2] - plain[e1]) / (e2 - e1)
    ratio = areir_saved(arch, e2, s2, b, False) / areir_saved(arch, e2, s1, b, False)
    note = f"x{ratio:.2f} from {s1} to {s2} px (proportional would be x{(s2 / s1) ** 2:.2f}; fitted affine)"
    return kept[e1] + per_member * (members - e1), member_full, note


def generator_activations(batch: int, probe_batch: int, width: int, layers: int, heads: int, arch: str,
                          size: int) -> tuple[float, int]:
    from irgen.generator import IRGenGenerator

    def build() -> IRGenGenerator:
        return IRGenGenerator(code_depth=4, codebook_size=256, encoder={"arch": arch, "image_size": size},
                              encoder_init=None, width=width, layers=layers, heads=heads, dropout=0.0)

    torch.manual_seed(0)
    model = build().train()
    images, targets = torch.randn(probe_batch, 3, size, size), torch.randint(0, 256, (probe_batch, 4))

    def forward() -> torch.Tensor:
        logits = model.teacher_forced_logits(model.encoder(images), targets)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    saved = saved_activation_bytes(forward, model, bf16=True)
    return saved * batch / probe_batch, parameter_count(build)[1]


def line(name: str, params: int, activations: float, extra: float = 0.0) -> str:
    state = params * STATE_BYTES_PER_PARAM / GiB
    copies = params * AUTOCAST_COPY_BYTES_PER_PARAM / GiB
    total = state + copies + (activations + extra) / GiB
    return (f"| {name} | {params / 1e6:,.1f} M | {state:.2f} | {copies:.2f} | {(activations + extra) / GiB:.2f} | "
            f"**{total:.1f}** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="toy sizes: checks the script in seconds")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.toy:
        archs, members, size, batch = ["resnet18"], 4, 64, 2
        probe = {"members": (1, 2), "sizes": (32, 64), "batch": 2}
        gen = dict(batch=4, probe_batch=1, width=32, layers=1, heads=2, arch="vit_tiny", size=32)
    else:
        archs, members, size, batch = ["resnet18", "resnet50"], 48, 256, 12
        probe = {"members": (1, 3), "sizes": (64, 128), "batch": 2}
        gen = dict(batch=64, probe_batch=2, width=768, layers=12, heads=12, arch="vit_b_16", size=224)
    print(f"predicted peak training memory, bf16-mixed, Adam (GiB; activations measured on CPU at "
          f"E={probe['members']}, {probe['sizes']} px, batch {probe['batch']} and extrapolated)\n")
    print("| setting | parameters | fp32 weights+grads+Adam | bf16 copies | activations | predicted peak |")
    print("|---|---|---|---|---|---|")
    notes = []
    for arch in archs:
        params = parameter_count(lambda a=arch: AREIRNet(AREIRNetConfig(a, members, 12, True, False, "loop")))[0]
        kept, member, note = areir_activations(arch, members, size, batch, False, probe)
        notes.append(f"AREIR {arch}: saved activations grew {note}")
        name = f"AREIR {arch}+SE E={members} M=12, {size} px, batch {batch}"
        print(line(name, params, kept))
        kept_ckpt, member, _ = areir_activations(arch, members, size, batch, True, probe)
        print(line(name + ", member checkpointing (loop: + one member recomputed)", params, kept_ckpt, member))
    acts, params = generator_activations(**gen)
    print(line(f"IRGen generator {gen['arch']} + decoder {gen['width']}x{gen['layers']}, {gen['size']} px, "
               f"batch {gen['batch']} (encoder trained)", params, acts))
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
