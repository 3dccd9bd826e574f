"""Evaluation protocols: which images train the model and which ones are queries and gallery.

Two protocols are supported and every result records which one produced it:

* ``zero_shot`` -- the deep-metric-learning standard. Training classes and test classes are disjoint: the first
  half of the class ids (in id order) trains and the second half tests for CUB/CARS/the embedded set; SOP uses its
  train/test files and In-shop its train vs query/gallery partition. Retrieval is all-vs-all inside the test set
  with the query itself excluded by index (In-shop: query -> gallery).
* ``closed_set`` -- the IRGen paper's. Every test class is seen in training and the database is trained on:
  CUB/CARS train on their official train split, which is also the database (gallery), and their test split
  queries it. In-shop is the paper's "trainval" setting: training uses the train *and* gallery items (all
  7,982 items; never the queries), the database is the gallery (12,612 images) and the 14,218 queries search it.

Model selection must not look at the test set, so `build_protocol` can also carve a validation set out of the
training data (``val_fraction``):

* zero-shot: held-out *classes* (they leave training entirely, like the test classes);
* closed-set: held-out *images* of every class that can spare one. They are held out as training **inputs**
  only: the database (``target_ids``, what a generative model learns to emit and what the test gallery holds)
  keeps every image, so no test identifier is removed from the training targets. Validation queries retrieve
  from the remaining training images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from datamodules.records import ImageRecord

PROTOCOLS = ("zero_shot", "closed_set")


@dataclass
class EvalSet:
    """Images evaluated together: each is a query, a gallery item, or both (all-vs-all, self excluded by index)."""

    name: str
    record_ids: np.ndarray  # int64 [N], positions in the dataset's record list
    labels: np.ndarray  # int64 [N], original class ids
    query_mask: np.ndarray  # bool [N]
    gallery_mask: np.ndarray  # bool [N]

    def __len__(self) -> int:
        return len(self.record_ids)

    @property
    def query_positions(self) -> np.ndarray:
        return np.flatnonzero(self.query_mask)

    @property
    def gallery_positions(self) -> np.ndarray:
        return np.flatnonzero(self.gallery_mask)

    def queries(self, values: np.ndarray) -> np.ndarray:
        """The query rows of `values` (rows in eval-set order): `values` itself, not a copy, when every image is
        a query (all-vs-all, SOP: a copy of AREIR's 60,502 x 24,000 embedding would be another 5.8 GB)."""
        return values if self.query_mask.all() else values[self.query_mask]

    def gallery(self, values: np.ndarray) -> np.ndarray:
        """The gallery rows of `values`; `values` itself when every image is in the gallery."""
        return values if self.gallery_mask.all() else values[self.gallery_mask]

    def subset(self, positions: np.ndarray) -> EvalSet:
        """The same set restricted to `positions` (e.g. when a debug run evaluates only a few batches)."""
        positions = np.asarray(positions, dtype=np.int64)
        return EvalSet(
            self.name,
            self.record_ids[positions],
            self.labels[positions],
            self.query_mask[positions],
            self.gallery_mask[positions],
        )

    def self_exclusion(self) -> np.ndarray:
        """For each query, the gallery-row index of the same image (-1 when it is not in the gallery)."""
        gallery_row = np.full(len(self), -1, dtype=np.int64)
        gallery_row[self.gallery_positions] = np.arange(int(self.gallery_mask.sum()))
        return gallery_row[self.query_positions]


@dataclass
class ProtocolSplit:
    protocol: str
    train_ids: np.ndarray  # record ids used as training inputs
    train_classes: np.ndarray  # sorted original class ids of train_ids; model label = position in this array
    val: EvalSet
    test: EvalSet
    val_is_test: bool  # True when no validation split was carved (validation then reports test metrics)
    # record ids of the database a generative model may emit as targets (sorted): closed-set keeps the
    # validation queries here (held out as inputs only); zero-shot equals train_ids
    target_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.target_ids is None:
            self.target_ids = np.sort(self.train_ids)


def _eval_set(name: str, records: Sequence[ImageRecord], query_ids, gallery_ids) -> EvalSet:
    query_ids = np.asarray(query_ids, dtype=np.int64)
    gallery_ids = np.asarray(gallery_ids, dtype=np.int64)
    ids = np.union1d(query_ids, gallery_ids)
    return EvalSet(
        name=name,
        record_ids=ids,
        labels=np.array([records[i].label for i in ids], dtype=np.int64),
        query_mask=np.isin(ids, query_ids),
        gallery_mask=np.isin(ids, gallery_ids),
    )


def positions_by_class(labels: np.ndarray) -> list[np.ndarray]:
    """The positions of each class in `labels` (classes in sorted order, positions ascending), from one stable
    sort: O(N log N), where a mask per class is O(classes x N) (SOP: 11,318 x 59,551)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    return [order[a:a + n] for a, n in zip(starts, counts, strict=True)]


def first_half_classes(labels: np.ndarray) -> np.ndarray:
    """The zero-shot training classes of CUB/CARS-style datasets: the first half of the class ids in id order."""
    classes = np.unique(labels)
    return classes[: len(classes) // 2]


def build_protocol(
    records: Sequence[ImageRecord],
    protocol: str,
    *,
    zero_shot_split: str,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> ProtocolSplit:
    """Split records for `protocol`.

    zero_shot_split: ``"class_halves"`` (CUB, CARS, embedded: first half of class ids trains) or ``"official"``
    (SOP, In-shop: the official files already separate the classes).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    labels = np.array([r.label for r in records], dtype=np.int64)
    splits = np.array([r.split for r in records])
    all_ids = np.arange(len(records))
    has_query_gallery = bool(np.isin(splits, ["query", "gallery"]).any())

    if has_query_gallery:  # In-shop: both protocols retrieve query -> gallery
        # zero-shot trains on the train items (disjoint from the gallery's); closed-set on train + gallery
        # (the IRGen paper's trainval setting: every gallery identifier is a training target)
        train_split = ["train"] if protocol == "zero_shot" else ["train", "gallery"]
        train_ids = all_ids[np.isin(splits, train_split)]
        test = _eval_set("test", records, all_ids[splits == "query"], all_ids[splits == "gallery"])
    elif protocol == "zero_shot":
        if zero_shot_split == "class_halves":
            train_mask = np.isin(labels, first_half_classes(labels))
        elif zero_shot_split == "official":
            train_mask = splits == "train"
        else:
            raise ValueError(f"zero_shot_split must be 'class_halves' or 'official', got {zero_shot_split!r}")
        train_ids, test_ids = all_ids[train_mask], all_ids[~train_mask]
        test = _eval_set("test", records, test_ids, test_ids)
    else:  # closed_set
        train_ids, test_ids = all_ids[splits == "train"], all_ids[splits == "test"]
        shared = np.intersect1d(labels[train_ids], labels[test_ids])
        if len(shared) == 0:
            raise ValueError(
                "closed_set needs classes that appear in both the train and the test split, but this dataset's "
                "official splits have disjoint classes (e.g. SOP). Use protocol=zero_shot for it."
            )
        test = _eval_set("test", records, test_ids, train_ids)

    if len(train_ids) == 0 or len(test) == 0:
        raise ValueError(f"protocol {protocol} left an empty train or test set ({len(train_ids)}/{len(test)} images)")

    val, val_is_test = test, True
    # closed-set: the database keeps the validation queries (held out as inputs only), zero-shot: it does not
    target_ids = np.sort(train_ids)
    if val_fraction > 0:
        train_ids, val = _carve_validation(records, labels, train_ids, protocol, val_fraction, seed)
        val_is_test = False
        if protocol == "zero_shot":
            target_ids = np.sort(train_ids)
    return ProtocolSplit(
        protocol=protocol,
        train_ids=train_ids,
        train_classes=np.unique(labels[train_ids]),
        val=val,
        test=test,
        val_is_test=val_is_test,
        target_ids=target_ids,
    )


def _carve_validation(records, labels, train_ids, protocol, fraction, seed):
    """Hold out classes (zero-shot) or per-class images (closed-set) from the training inputs for model selection.

    Returns (training input ids, validation set). Closed-set validation queries retrieve the kept training images.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[train_ids])
    if protocol == "zero_shot":
        n_val = max(2, int(round(fraction * len(classes))))
        if n_val >= len(classes):
            raise ValueError(f"val_fraction={fraction} leaves no training classes out of {len(classes)}")
        val_classes = rng.choice(classes, size=n_val, replace=False)
        in_val = np.isin(labels[train_ids], val_classes)
        val_ids = train_ids[in_val]
        return train_ids[~in_val], _eval_set("val", records, val_ids, val_ids)
    # closed-set: floor(fraction x n) held-out images per class, then the rest of the overall quota
    # round(fraction x N) one image each from randomly chosen classes that can spare one more (so that ~5-image
    # classes, In-shop's, do not each give up one image: 21% instead of 10%). Classes grouped by one sort.
    members_of = [train_ids[m] for m in positions_by_class(labels[train_ids])]
    counts = np.array([len(m) for m in members_of])
    n_query = np.floor(fraction * counts + 1e-9).astype(np.int64)
    n_query = np.minimum(n_query, counts - 1)  # every class keeps a training image
    spare = np.flatnonzero(n_query < counts - 1)
    extra = int(round(fraction * len(train_ids))) - int(n_query.sum())
    if extra > 0:
        n_query[np.random.default_rng((seed, 1)).permutation(spare)[:extra]] += 1
    query_ids, keep_ids = [], []
    for members, n in zip(members_of, n_query, strict=True):
        chosen = rng.permutation(members)
        query_ids.extend(chosen[:n])
        keep_ids.extend(chosen[n:])
    keep_ids = np.sort(np.asarray(keep_ids, dtype=np.int64))
    return keep_ids, _eval_set("val", records, query_ids, keep_ids)
