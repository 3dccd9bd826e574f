"""A gallery embedded once and searched many times: ``python index.py`` writes an index folder, ``python eval.py
index=<dir> query=...`` and ``python serve.py index=<dir>`` search it without re-embedding anything.

The folder:

* ``manifest.json`` -- what the index was built with: the checkpoint (path and sha256), the method and model
  class, the transform (size, resize, mean/std), the embedding size and metric, counts, the faiss index type and
  parameters, the irlab version. A search with another checkpoint or transform is refused with both hashes;
* ``rows.jsonl`` -- one line per gallery row: file (resolved path) or dataset record path, record id, label;
* ``embeddings.npy`` (float16 or float32, ``dtype``) and ``index.faiss`` (``index_type``: flat = exact inner
  product, ivfpq and hnsw with the parameters of `irlab.retrieval.ann`, IVF trained on a sample of at most
  ``train_points`` rows) -- embedding models;
* ``identifiers.npy`` -- IRGen generators: the gallery records' identifiers (from the checkpoint, which carries
  every dataset record's); the search is beam search over their trie, as in evaluation, so only dataset images
  can be indexed;
* ``unreadable.txt`` -- images that could not be read, skipped (and tried again by the next build).

Building is resumable and incremental: the images to embed are listed in ``pending.json`` and embedded in chunks
(``chunks/<n>.npz``) that a killed build keeps, so running the same command again continues after the last
finished chunk; running it on a grown folder embeds only the files the index does not have yet. Cost at SOP size
(60,502 gallery images): one pass of the model over the gallery (what `eval.py` pays on every query otherwise),
host memory for the embeddings (60,502 x 512 float16 = 62 MB) and one faiss index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import faiss
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, default_collate

from datamodules.base import RetrievalDataModule
from datamodules.errors import MissingFileError, UserInputError
from datamodules.paths import expand_path
from irlab.atomic_files import write_atomically, write_text_atomically
from irlab.gallery import GalleryItem, ItemImages, gallery_items
from irlab.inference import NoImagesError, evaluation_mode, map_images
from irlab.retrieval.ann import build_index

log = logging.getLogger(__name__)
MANIFEST, ROWS, EMBEDDINGS, FAISS_INDEX = "manifest.json", "rows.jsonl", "embeddings.npy", "index.faiss"
IDENTIFIERS, UNREADABLE, PENDING, CHUNKS = "identifiers.npy", "unreadable.txt", "pending.json", "chunks"
INDEX_TYPES = ("flat", "ivfpq", "hnsw")
DTYPES = {"float16": np.float16, "float32": np.float32}
FORMAT = 1


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def transform_settings(dm: RetrievalDataModule) -> dict:
    """What a model's input depends on besides the image: the evaluation transform's settings."""
    return {"image_size": dm.image_size, "resize_size": dm.resize_size, "resize_mode": dm.resize_mode,
            "interpolation": dm.interpolation, "mean": list(dm.mean), "std": list(dm.std), "crop": dm.crop}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def identity(ckpt: str | Path, dm: RetrievalDataModule) -> dict:
    """What must be equal between an index and a search: the checkpoint's bytes and the transform."""
    transform = transform_settings(dm)
    return {"checkpoint_sha256": file_sha256(ckpt), "transform": transform, "transform_hash": settings_hash(transform)}


def irlab_version() -> str:
    try:
        return version("irlab")
    except PackageNotFoundError:
        return "unknown"


def check_identity(manifest: dict, expected: dict, folder: Path) -> None:
    """Refuse an index built with another checkpoint or transform, naming both."""
    got = {k: manifest.get(k) for k in ("checkpoint_sha256", "transform_hash")}
    want = {k: expected[k] for k in ("checkpoint_sha256", "transform_hash")}
    if got != want:
        raise UserInputError(
            f"index {folder} was built with checkpoint sha256 {got['checkpoint_sha256']} and transform "
            f"{got['transform_hash']} ({manifest.get('checkpoint')}), but this run has checkpoint sha256 "
            f"{want['checkpoint_sha256']} and transform {want['transform_hash']}: its embeddings are not comparable. "
            f"Search with the index's checkpoint, or build a new index (out=<another folder>)")


def read_manifest(folder: str | Path) -> dict:
    path = expand_path(str(folder)) / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"index={folder}: no {MANIFEST} there; build one with python index.py "
                               f"ckpt_path=<checkpoint> gallery=<folder | test> out={folder}")
    return json.loads(path.read_text())


def read_rows(folder: Path) -> list[GalleryItem]:
    path = folder / ROWS
    if not path.is_file():
        return []
    return [GalleryItem(**json.loads(line)) for line in path.read_text().splitlines() if line]


def collate_readable(samples: list[dict | None]) -> dict | None:
    kept = [s for s in samples if s is not None]
    return default_collate(kept) if kept else None


# ---- building -------------------------------------------------------------------------------------------------
def build_saved_index(cfg: DictConfig, dm: RetrievalDataModule, model, ckpt: str) -> Path:
    """Write (or extend) the index folder ``cfg.out`` for the gallery ``cfg.gallery``."""
    out = expand_path(str(cfg.out))
    if cfg.index_type not in INDEX_TYPES or cfg.dtype not in DTYPES:
        raise UserInputError(f"index_type must be one of {INDEX_TYPES} and dtype one of {sorted(DTYPES)}, got "
                             f"index_type={cfg.index_type}, dtype={cfg.dtype}")
    expected = identity(ckpt, dm)
    old = read_manifest(out) if (out / MANIFEST).is_file() else None
    if old is not None:
        check_identity(old, expected, out)
    rows = read_rows(out) if old is not None else []
    known = {row.name for row in rows}
    items = [item for item in gallery_items(str(cfg.gallery), dm) if item.name not in known]
    kind = getattr(model, "index_kind", "embedding")
    if kind == "identifiers" and any(item.record_id is None for item in items):
        raise UserInputError("an IRGen generator retrieves only images with identifiers, i.e. images of the dataset "
                             "it was trained with: gallery=test (or val, train), not a folder")
    log.info(f"index {out}: {len(rows)} rows already, {len(items)} new images")
    out.mkdir(parents=True, exist_ok=True)
    if kind == "identifiers":
        new_rows, unreadable = items, []
        vectors = None
    else:
        new_rows, vectors, unreadable = embed_in_chunks(model, dm, items, out, int(cfg.chunk_size))
    write_atomically(out / UNREADABLE, lambda f: f.write("".join(f"{name}\n" for name in unreadable).encode()))
    if unreadable:
        log.warning(f"{len(unreadable)} unreadable images skipped (listed in {out / UNREADABLE})")
    before, rows = len(rows), rows + new_rows
    if kind == "identifiers":
        ids = np.array([r.record_id for r in rows], dtype=np.int64)
        codes = model.codes[torch.as_tensor(ids)].cpu().numpy()
        write_atomically(out / IDENTIFIERS, lambda f: np.save(f, codes))
        index_info = {"index_type": "beam search over the identifiers' trie", "identifier_length": codes.shape[1],
                      "codebook_size": int(model.hparams.codebook_size)}
        dim = None
    else:
        embeddings = vectors
        if before:  # the index grows: the rows it had keep their embeddings
            previous = np.load(out / EMBEDDINGS).astype(np.float32)
            embeddings = np.concatenate([previous, vectors]) if len(vectors) else previous
        if not len(embeddings):
            raise UserInputError(f"gallery={cfg.gallery}: no readable image to index (see {out / UNREADABLE})")
        stored = embeddings.astype(DTYPES[cfg.dtype])
        write_atomically(out / EMBEDDINGS, lambda f: np.save(f, stored))
        index_info = write_faiss_index(out, stored.astype(np.float32), cfg)
        dim = int(embeddings.shape[1])
    write_text_atomically(out / ROWS, "".join(json.dumps(r.as_json()) + "\n" for r in rows))
    manifest = {"format": FORMAT, "checkpoint": str(Path(ckpt).resolve()), **expected, "method": cfg.method.name,
                "model_class": type(model).__name__, "kind": kind, "embedding_size": dim,
                "metric": "inner product of L2-normalised embeddings" if kind == "embedding" else "beam search",
                "score_name": model.score_name, "rows": len(rows), "unreadable": len(unreadable),
                "dtype": cfg.dtype if kind == "embedding" else None, **index_info, "irlab_version": irlab_version(),
                "gallery": str(cfg.gallery), "dataset": dm.name, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    shutil.rmtree(out / CHUNKS, ignore_errors=True)
    (out / PENDING).unlink(missing_ok=True)
    log.info(f"index {out}: {len(rows)} rows ({len(new_rows)} added)")
    return out


def embed_in_chunks(model, dm: RetrievalDataModule, items: list[GalleryItem], out: Path, chunk_size: int
                    ) -> tuple[list[GalleryItem], np.ndarray, list[str]]:
    """Embed `items` chunk by chunk, keeping finished chunks on disk (``chunks/<n>.npz``) so that a killed
    build resumes; returns the embedded items, their embeddings and the names of the unreadable ones."""
    pending = {"items": [item.as_json() for item in items], "chunk_size": chunk_size}
    chunks = out / CHUNKS
    if not (out / PENDING).is_file() or json.loads((out / PENDING).read_text()) != pending:
        shutil.rmtree(chunks, ignore_errors=True)  # another set of images to embed: start over
        write_text_atomically(out / PENDING, json.dumps(pending))
    chunks.mkdir(exist_ok=True)
    starts = range(0, len(items), chunk_size)
    done = [s for s in starts if (chunks / f"{s // chunk_size:06d}.npz").is_file()]
    if done:
        log.info(f"resuming: {len(done)} of {len(starts)} chunks already embedded")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} images/s"),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("embed", total=len(items), completed=len(done) * chunk_size, rate="-")
        start_time, embedded_now = time.perf_counter(), 0
        for start in starts:
            path = chunks / f"{start // chunk_size:06d}.npz"
            if path.is_file():
                continue
            part = items[start:start + chunk_size]
            vectors, positions = embed_items(model, dm, part, device)
            write_atomically(path, lambda f, v=vectors, p=positions: np.savez(f, vectors=v, positions=p))
            embedded_now += len(part)
            rate = embedded_now / max(1e-9, time.perf_counter() - start_time)
            progress.update(task, advance=len(part), rate=f"{rate:.0f}")
    rows, vectors, unreadable = [], [], []
    for start in starts:
        part = items[start:start + chunk_size]
        with np.load(chunks / f"{start // chunk_size:06d}.npz") as saved:
            positions = set(saved["positions"].tolist())
            vectors.append(saved["vectors"])
        rows += [item for i, item in enumerate(part) if i in positions]
        unreadable += [item.name for i, item in enumerate(part) if i not in positions]
    vectors = [v for v in vectors if len(v)]  # a chunk of unreadable images only has none
    return rows, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32), unreadable


def embed_items(model, dm: RetrievalDataModule, items: list[GalleryItem], device: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """(float32 L2-normalised embeddings of the readable items, their positions in `items`)."""
    loader = DataLoader(ItemImages(items, dm, dm.eval_transform(), skip_unreadable=True),
                        batch_size=dm.eval_batch_size, shuffle=False, num_workers=dm.num_workers,
                        collate_fn=collate_readable)
    try:
        with torch.no_grad():
            vectors, positions = map_images(model, model.unit_embedding, loader, device, with_index=True)
    except NoImagesError:  # a chunk of unreadable images only
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return vectors.numpy(), positions.numpy()


def write_faiss_index(out: Path, embeddings: np.ndarray, cfg: DictConfig) -> dict:
    if cfg.index_type == "flat":
        index = faiss.IndexFlatIP(embeddings.shape[1])
        index.add(embeddings)
        used = {}
    else:
        settings = OmegaConf.to_container(cfg.evaluation[cfg.index_type])  # conf/evaluation/default.yaml
        index, used = build_index(cfg.index_type, settings, embeddings,
                                  train_points=int(cfg.train_points))
    write_atomically(out / FAISS_INDEX, lambda f: f.write(faiss.serialize_index(index).tobytes()))
    return {"index_type": cfg.index_type, "index_parameters": used}


# ---- searching ------------------------------------------------------------------------------------------------
@dataclass
class SavedIndex:
    """A loaded index folder: its manifest, rows and what searches it."""

    folder: Path
    manifest: dict
    rows: list[GalleryItem]

    @classmethod
    def load(cls, folder: str | Path) -> SavedIndex:
        folder = expand_path(str(folder))
        return cls(folder, read_manifest(folder), read_rows(folder))

    def check(self, ckpt: str, dm: RetrievalDataModule) -> None:
        check_identity(self.manifest, identity(ckpt, dm), self.folder)

    @property
    def labels(self) -> np.ndarray | None:
        labels = [r.label for r in self.rows]
        return None if any(label is None for label in labels) else np.array(labels)

    @property
    def record_ids(self) -> np.ndarray | None:
        ids = [r.record_id for r in self.rows]
        return None if any(i is None for i in ids) else np.array(ids, dtype=np.int64)

    def searcher(self, model):
        """``search(images, k) -> (rows [Q, k], scores [Q, k])`` against this index with `model` (-1 padded)."""
        if self.manifest["kind"] == "identifiers":
            trie = model.index_gallery(None, self.record_ids)
            return lambda images, k: model.search(trie, images, k)
        index = faiss.read_index(str(self.folder / FAISS_INDEX))
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = max(index.hnsw.efSearch, 64)

        def search(images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
            with evaluation_mode(model), torch.no_grad():
                queries = model.unit_embedding(images.to(model.device)).float().cpu().numpy()
            scores, rows = index.search(np.ascontiguousarray(queries), min(k, index.ntotal))
            pad = k - rows.shape[1]
            return (np.pad(rows, ((0, 0), (0, pad)), constant_values=-1),
                    np.pad(np.where(rows >= 0, scores, np.nan), ((0, 0), (0, pad)), constant_values=np.nan))

        return search
