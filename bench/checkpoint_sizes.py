"""Checkpoint sizes and disk per run of the benchmark presets, from exact parameter counts (models built on the
meta device from the presets' own configs; no data, no weights needed).

    python bench/checkpoint_sizes.py

Per run folder (per IRGen stage folder): the selected model (weights only, float32: 4 bytes per parameter),
``last.ckpt`` (weights and Adam's two moments: 12 bytes per parameter, plus buffers) and, after a SIGTERM or a
crash, ``on_exception.ckpt`` (the same full state). Class counts are the presets' training classes (zero-shot:
CUB 100, CARS 98, SOP 11,318, In-shop 3,997 items; IRGen closed-set In-shop: 7,982 items, CUB 200, CARS 196).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
CLASSES = {"cub": 100, "car": 98, "sop": 11_318, "isc": 3_997}
CLOSED_SET_CLASSES = {"cub": 200, "car": 196, "isc": 7_982}


def counts(module: torch.nn.Module) -> tuple[int, int, int]:
    """(parameters, trainable parameters, buffer elements)."""
    params = list(module.parameters())
    return (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
            sum(b.numel() for b in module.buffers()))


def build(node, **kwargs) -> torch.nn.Module:
    """On the meta device; on the CPU where construction needs data (AREIR copies its partitions in)."""
    try:
        with torch.device("meta"):
            return hydra.utils.instantiate(node, **kwargs, _recursive_=False)
    except hydra.errors.InstantiationException:
        return hydra.utils.instantiate(node, **kwargs, _recursive_=False)


def sizes(module: torch.nn.Module) -> tuple[float, float, float]:
    """(parameters in millions, weights-only GiB, full-state GiB) at float32 with Adam."""
    total, trainable, buffers = counts(module)
    weights = 4 * (total + buffers)
    return total / 1e6, weights / GiB, (weights + 8 * trainable) / GiB


def main() -> None:
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    rows = []
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        for experiment in ("cub_baseline", "sop_baseline", "cub_areir", "sop_areir", "isc_areir"):
            cfg = compose("train", overrides=[f"experiment={experiment}", "model.pretrained=false"])
            rows.append((experiment, "model", *sizes(build(cfg.model, num_classes=CLASSES[experiment[:3]]))))
        for experiment in ("cub_irgen", "isc_irgen"):
            for recipe in ([], ["recipe=irgen_paper"]):
                cfg = compose("train", overrides=[f"experiment={experiment}", *recipe])
                with open_dict(cfg):
                    cfg.irgen.tokenizer.encoder.pretrained = False
                    cfg.irgen.generator.encoder = OmegaConf.to_container(cfg.irgen.tokenizer.encoder)
                name = experiment + (" + irgen_paper" if recipe else "")
                classes = CLOSED_SET_CLASSES[experiment[:3]]
                rows.append((name, "tokenizer", *sizes(build(cfg.irgen.tokenizer, num_classes=classes,
                                                             num_codes=256))))
                rows.append((name, "generator", *sizes(build(cfg.irgen.generator, code_depth=4,
                                                             codebook_size=256))))
    print(f"{'preset':<26} {'model':<10} {'params M':>9} {'weights GiB':>12} {'last.ckpt GiB':>14} "
          f"{'per run GiB':>12}")
    for name, part, millions, weights, full in rows:
        # selected weights + last.ckpt (+ on_exception.ckpt after a SIGTERM: one more full state)
        print(f"{name:<26} {part:<10} {millions:>9.1f} {weights:>12.2f} {full:>14.2f} "
              f"{weights + full:>6.2f}-{weights + 2 * full:.2f}")


if __name__ == "__main__":
    main()
