"""`python eval.py ckpt_path=<checkpoint> query=<image | folder | dataset record>`: the top-K of any query, against
the dataset's test gallery or ``gallery=<folder>`` embedded now, or against a saved index (``index=<dir>``, built
by `index.py`: only the queries are embedded; `irlab.saved_index`).

Works for every method's checkpoint: the method's ``load`` function (`irlab.methods`) rebuilds the model, and the
model ranks through its own `index_gallery` / `search` (embedding models: cosine kNN; the IRGen generator:
beam search constrained to the gallery's identifiers). The gallery is the checkpoint's dataset's test gallery,
or ``gallery=<folder>`` (any images; embedding models only: IRGen identifiers exist for dataset images only).

A query that is an image of the dataset (its file, or a record path such as ``digits://1005``) never retrieves
itself, and when the gallery is the dataset's its neighbours are framed green (same class) or red; other queries
get grey frames. The grid goes to ``<run folder>/query_grid.png``, the ranked lists to ``query_results.json``
and to the terminal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.base import RetrievalDataModule, open_rgb
from datamodules.errors import MissingFileError
from datamodules.paths import expand_path
from irlab.gallery import GalleryItem, ItemImages, image_files, item_image
from irlab.method import ModelLoader
from irlab.retrieval import plot_retrieval_grid
from irlab.saved_index import SavedIndex

log = logging.getLogger(__name__)
MAX_GRID_ROWS = 16  # a folder of queries: every ranking is printed and saved, the first rows are drawn


@dataclass
class Gallery:
    loader: DataLoader | None  # the gallery images, eval transform, in row order (None: a saved index)
    names: list[str]  # printed for each row (file or record path)
    image: Callable[[int], Image.Image]  # row -> the image as stored (for the grid)
    labels: np.ndarray | None = None  # None: labels unknown (a folder)
    record_ids: np.ndarray | None = None  # dataset records behind the rows; None for a folder


@dataclass
class Query:
    name: str
    image: Image.Image
    record_id: int | None = None  # the dataset record it is, if it is one
    label: int | None = None


@dataclass
class Hits:
    query: Query
    rows: np.ndarray  # gallery rows, best first
    scores: np.ndarray
    correct: np.ndarray | None  # None when the query's or the gallery's labels are unknown


def dataset_gallery(dm: RetrievalDataModule) -> Gallery:
    """The test split's gallery (what `eval.py` scores against)."""
    test = dm.eval_set("test")
    ids = test.record_ids[test.gallery_mask]
    return Gallery(dm.inference_loader(dm.record_dataset(ids)), [str(dm.records[i].path) for i in ids],
                   lambda row: dm.load_image(int(ids[row])), dm.record_labels(ids), ids)


def folder_gallery(folder: Path, dm: RetrievalDataModule) -> Gallery:
    items = [GalleryItem(str(f)) for f in image_files(folder)]
    return Gallery(dm.inference_loader(ItemImages(items, dm, dm.eval_transform())), [i.name for i in items],
                   lambda row: open_rgb(items[row].name))


def saved_gallery(index: SavedIndex, dm: RetrievalDataModule) -> Gallery:
    """The gallery of a saved index: its rows, read only when drawn (no loader: nothing is embedded again)."""
    return Gallery(None, [r.name for r in index.rows], lambda row: item_image(index.rows[row], dm), index.labels,
                   index.record_ids)


def read_queries(query: str, dm: RetrievalDataModule) -> list[Query]:
    """One query per image: `query` is an image file, a folder of images, or a dataset record path."""
    by_path = {str(r.path): i for i, r in enumerate(dm.records)}
    by_file = {str(Path(r.path).resolve()): i for i, r in enumerate(dm.records) if "://" not in str(r.path)}

    def record_query(record: int, name: str) -> Query:
        return Query(name, dm.load_image(record), record, int(dm.records[record].label))

    if query in by_path:
        return [record_query(by_path[query], query)]
    path = expand_path(query)
    files = image_files(path) if path.is_dir() else [path] if path.is_file() else None
    if files is None:
        raise MissingFileError(f"query={query}: no such image, folder or record of {dm.name} (a record path looks "
                                f"like {dm.records[0].path})")
    queries = []
    for f in files:
        record = by_file.get(str(f.resolve()))
        queries.append(record_query(record, str(f)) if record is not None else Query(str(f), open_rgb(f)))
    return queries


Search = Callable[[torch.Tensor, int], tuple[np.ndarray, np.ndarray]]  # (images, k) -> (rows, scores), -1 padded


def in_memory_search(model, gallery: Gallery) -> Search:
    """Embed (or, for IRGen, index) the whole gallery now and search it with the model: what `eval.py query=`
    does without a saved index."""
    index = model.index_gallery(gallery.loader, gallery.record_ids)
    return lambda images, k: model.search(index, images, k)


def retrieve(search: Search, gallery: Gallery, queries: list[Query], top_k: int, transform,
             batch_size: int) -> list[Hits]:
    """Each query's top-`top_k` gallery rows (a dataset query never retrieves itself)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    row_of_record = {} if gallery.record_ids is None else {int(r): i for i, r in enumerate(gallery.record_ids)}
    hits = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        images = torch.stack([transform(q.image) for q in chunk])
        rows, scores = search(images, top_k + 1)
        for q, r, s in zip(chunk, rows, scores, strict=True):
            keep = (r >= 0) & (r != row_of_record.get(q.record_id, -2))
            r, s = r[keep][:top_k], s[keep][:top_k]
            known = q.label is not None and gallery.labels is not None
            hits.append(Hits(q, r, s, gallery.labels[r] == q.label if known else None))
    return hits


def report(hits: list[Hits], gallery: Gallery, score_name: str, folder: Path) -> dict[str, float]:
    """Print every ranking, save them (JSON) and draw the grid; precision@K of the queries with known labels."""
    results = []
    for h in hits:
        print(f"query {h.query.name}:")
        for rank, (row, score) in enumerate(zip(h.rows, h.scores, strict=True), 1):
            mark = "" if h.correct is None else ("  correct" if h.correct[rank - 1] else "  wrong")
            print(f"  #{rank}: {gallery.names[row]}  {score_name} {score:.4f}{mark}")
        results.append({"query": h.query.name, "neighbors": [gallery.names[r] for r in h.rows],
                        "scores": [float(s) for s in h.scores],
                        "correct": None if h.correct is None else h.correct.tolist()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "query_results.json").write_text(json.dumps({"score": score_name, "results": results}, indent=1))
    drawn = hits[:MAX_GRID_ROWS]
    grid = plot_retrieval_grid([np.asarray(h.query.image.convert("RGB")) for h in drawn],
                               [[np.asarray(gallery.image(int(r)).convert("RGB")) for r in h.rows] for h in drawn],
                               [None if h.correct is None else h.correct.tolist() for h in drawn],
                               [h.scores.tolist() for h in drawn], folder / "query_grid.png", score_name=score_name)
    if len(hits) > len(drawn):
        print(f"(the grid shows the first {len(drawn)} of {len(hits)} queries; query_results.json has all)")
    print(f"retrieval grid written to {grid}")
    judged = [h.correct for h in hits if h.correct is not None and len(h.correct)]
    return {f"query/P@{len(hits[0].rows)}": float(np.mean([c.mean() for c in judged]))} if judged else {}


def query_checkpoint(cfg: DictConfig, datamodule: RetrievalDataModule, load: ModelLoader) -> dict[str, float]:
    """`eval.py query=...`: load ``ckpt_path`` with the method's loader and retrieve for every query image."""
    model, _ = load(cfg, datamodule)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    gallery = folder_gallery(expand_path(cfg.gallery), datamodule) if cfg.gallery else \
        dataset_gallery(datamodule)
    return answer(cfg, datamodule, in_memory_search(model, gallery), gallery, model.score_name)


def query_saved_index(cfg: DictConfig, datamodule: RetrievalDataModule, load: ModelLoader) -> dict[str, float]:
    """`eval.py index=<dir> query=...`: embed only the queries and search the saved index (`irlab.saved_index`),
    after checking that it was built with this checkpoint and transform."""
    index = SavedIndex.load(cfg.index)
    model, ckpt = load(cfg, datamodule)
    index.check(ckpt, datamodule)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return answer(cfg, datamodule, index.searcher(model), saved_gallery(index, datamodule), model.score_name)


def answer(cfg: DictConfig, datamodule: RetrievalDataModule, search: Search, gallery: Gallery,
           score_name: str) -> dict[str, float]:
    queries = read_queries(str(cfg.query), datamodule)
    hits = retrieve(search, gallery, queries, int(cfg.top_k), datamodule.eval_transform(), datamodule.eval_batch_size)
    return report(hits, gallery, score_name, Path(cfg.paths.output_dir))
