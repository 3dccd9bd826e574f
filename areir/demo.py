"""Inference demo: retrieve the top-K test-split gallery images for one query image and save them as a PNG grid.

    python -m areir.demo query=path/to/image.jpg ckpt_path=path/to/run/checkpoints/epoch_005.ckpt \\
        [experiment=cub_areir] [top_k=8] [output=retrieval.png] [device=cpu|cuda] [any Hydra override ...]

* ``query``: any image file (any size, grayscale or colour, PNG/JPEG/...), or a dataset record path (for the
  embedded digits: ``digits://<index>``). When the query is an image of the dataset's test split, the grid frames
  correct matches green and wrong ones red and the query itself is excluded; for any other image the borders are
  neutral grey (correctness is unknown).
* The model is rebuilt from the checkpoint's own hyper-parameters (weights-only load), so only the dataset needs
  configuring: ``experiment=...`` or ``dataset=...`` plus overrides, composed from ``conf/eval.yaml`` exactly as
  ``eval.py`` does (default: the embedded digits).
* The gallery is the test split's gallery, embedded on the fly (use ``device=cuda`` for the big datasets).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw, ImageOps

from areir.module import AREIRModule
from datamodules.base import RetrievalDataModule, open_rgb
from irlab.paths import expand_path
from irlab.train import build_datamodule

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEMO_KEYS = ("query", "ckpt_path", "top_k", "output", "device")
CORRECT, WRONG, NEUTRAL, QUERY = (26, 152, 80), (215, 48, 39), (150, 150, 150), (40, 40, 40)


@dataclass
class DemoResult:
    path: Path  # the written PNG
    record_ids: list[int]  # dataset records of the top-K gallery images, best first
    scores: list[float]  # cosine similarities
    correct: list[bool] | None  # None when the query is not an image of the test split


def parse_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into demo options and Hydra overrides for the dataset configuration."""
    options, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value arguments, got {arg!r}. Usage: {__doc__.splitlines()[2].strip()}")
        if key in DEMO_KEYS:
            options[key] = value
        else:
            overrides.append(arg)
    for required in ("query", "ckpt_path"):
        if required not in options:
            raise SystemExit(f"missing {required}=... Usage: python -m areir.demo query=IMAGE ckpt_path=CKPT [top_k=8]")
    return options, overrides


def load_model(ckpt_path: str | Path, device: torch.device) -> AREIRModule:
    """Rebuild the AREIR module from the checkpoint's hyper-parameters and weights (``weights_only=True``)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "state_dict" not in ckpt or "members" not in hparams:
        raise ValueError(f"{path} is not an AREIR Lightning checkpoint (no state_dict / AREIR hyper-parameters)")
    hparams["pretrained"] = False  # the checkpoint has the weights; never download
    model = AREIRModule(**hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval().to(device)


def find_record(dm: RetrievalDataModule, query: str) -> int | None:
    """The dataset record of the query, if it is one (same path string or the same file)."""
    target = Path(query).expanduser()
    target = target.resolve() if target.exists() else None
    for i, record in enumerate(dm.records):
        if str(record.path) == query or (target is not None and Path(record.path).resolve() == target):
            return i
    return None


@torch.no_grad()
def embed_images(model: AREIRModule, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return F.normalize(model.embed(images.to(device)).float(), dim=-1).cpu()


@torch.no_grad()
def gallery_embeddings(model: AREIRModule, dm: RetrievalDataModule, device: torch.device) -> torch.Tensor:
    """Embeddings of the whole test eval set, in eval-set order."""
    chunks = [embed_images(model, batch["image"], device) for batch in dm.test_dataloader()]
    return torch.cat(chunks)


def thumbnail(img: Image.Image, size: int, border: int, color: tuple[int, int, int], caption: str) -> Image.Image:
    """The image letter-boxed into a square, framed in `color`, with a caption strip above it."""
    inner = ImageOps.pad(img.convert("RGB"), (size, size), color=(255, 255, 255))
    tile = Image.new("RGB", (size + 2 * border, size + 2 * border + 18), (255, 255, 255))
    ImageDraw.Draw(tile).rectangle([0, 18, tile.width - 1, tile.height - 1], fill=color)
    tile.paste(inner, (border, 18 + border))
    ImageDraw.Draw(tile).text((border, 3), caption, fill=color if color != NEUTRAL else (60, 60, 60))
    return tile


def save_grid(query: Image.Image, neighbors: list[Image.Image], scores: list[float], correct: list[bool] | None,
              path: Path, size: int = 128) -> Path:
    """One row: the query, then its neighbours framed green/red (or grey when correctness is unknown)."""
    tiles = [thumbnail(query, size, 6, QUERY, "query")]
    for k, (img, score) in enumerate(zip(neighbors, scores, strict=True)):
        color = NEUTRAL if correct is None else (CORRECT if correct[k] else WRONG)
        tiles.append(thumbnail(img, size, 6, color, f"#{k + 1}  cos {score:.4f}"))
    gap = 8
    grid = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) + 1), tiles[0].height + 2 * gap),
                     (255, 255, 255))
    x = gap
    for tile in tiles:
        grid.paste(tile, (x, gap))
        x += tile.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return path


def run_demo(model: AREIRModule, dm: RetrievalDataModule, query: str, top_k: int = 8,
             output: str | Path = "areir_demo.png", device: str | torch.device = "cpu") -> DemoResult:
    """Retrieve `top_k` test-split gallery images for `query` and write the grid to `output`."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = torch.device(device)
    dm.setup()
    record = find_record(dm, query)
    if record is not None:
        query_img = dm.load_image(record)
    elif Path(query).expanduser().is_file():
        query_img = open_rgb(Path(query).expanduser())
    else:
        raise FileNotFoundError(f"query image not found: {query} (give an image file or a dataset record path)")

    eval_set = dm.eval_set("test")
    embeddings = gallery_embeddings(model, dm, device)
    gallery_pos = eval_set.gallery_positions
    q = embed_images(model, dm.eval_transform()(query_img)[None], device)[0]
    scores = embeddings[gallery_pos] @ q

    in_test = record is not None and record in set(eval_set.record_ids.tolist())
    if in_test:  # exclude the query itself from its own results
        scores[torch.as_tensor(eval_set.record_ids[gallery_pos] == record)] = -float("inf")
    k = min(top_k, int(torch.isfinite(scores).sum()))
    top = torch.topk(scores, k)
    rows = gallery_pos[top.indices.numpy()]
    record_ids = eval_set.record_ids[rows].tolist()
    correct = None
    if in_test:
        query_label = dm.records[record].label
        correct = (eval_set.labels[rows] == query_label).tolist()
    path = save_grid(query_img, [dm.load_image(r) for r in record_ids], top.values.tolist(), correct, Path(output))
    return DemoResult(path, record_ids, top.values.tolist(), correct)


def main(argv: list[str] | None = None) -> DemoResult:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options, overrides = parse_argv(sys.argv[1:] if argv is None else argv)
    device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    cwd = Path.cwd()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"paths.root_dir={cwd}", f"paths.output_dir={cwd}",
                                         "ckpt_path=unused", *overrides])
    dm = build_datamodule(cfg)
    model = load_model(options["ckpt_path"], torch.device(device))
    if model.meta_labels.shape[1] != dm.num_classes:
        log.warning(f"the checkpoint was trained on {model.meta_labels.shape[1]} classes but this dataset config has "
                    f"{dm.num_classes} training classes: is experiment=... the one used for training?")
    # default: a run folder of its own under logs/, never the current directory
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    output = options.get("output") or (expand_path(cfg.paths.log_dir) / "demo" / "runs" / stamp /
                                       f"areir_demo_{Path(options['query']).stem or 'query'}.png")
    result = run_demo(model, dm, options["query"], int(options.get("top_k", 8)), output, device)
    for rank, (rid, score) in enumerate(zip(result.record_ids, result.scores, strict=True), 1):
        mark = "" if result.correct is None else ("  correct" if result.correct[rank - 1] else "  wrong")
        print(f"#{rank}: {dm.records[rid].path}  cos={score:.4f}{mark}")
    if result.correct is not None:
        print(f"precision@{len(result.correct)}: {np.mean(result.correct):.3f}")
    print(f"grid written to {result.path}")
    return result


if __name__ == "__main__":
    main()
