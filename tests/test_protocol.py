"""Protocol splits: who trains, who queries, who is gallery -- on hand-made records."""

import numpy as np
import pytest

from datamodules.protocol import build_protocol, first_half_classes
from datamodules.records import ImageRecord


def _records(classes, per_class, test_every=3):
    out = []
    for c in classes:
        for j in range(per_class):
            out.append(ImageRecord(f"{c}_{j}.jpg", c, "test" if j % test_every == 0 else "train"))
    return out


def test_first_half_is_by_class_id_order_not_appearance_order():
    labels = np.array([7, 3, 9, 1, 3, 7])
    assert first_half_classes(labels).tolist() == [1, 3]


def test_zero_shot_class_halves_disjoint_and_all_vs_all():
    records = _records([5, 1, 4, 2], per_class=3)
    split = build_protocol(records, "zero_shot", zero_shot_split="class_halves")
    train_labels = {records[i].label for i in split.train_ids}
    assert train_labels == {1, 2}
    assert set(split.test.labels.tolist()) == {4, 5}
    assert split.test.query_mask.all() and split.test.gallery_mask.all()
    # self exclusion points each query at its own gallery row
    assert split.test.self_exclusion().tolist() == list(range(len(split.test)))
    assert split.val_is_test


def test_zero_shot_official_uses_split_tags():
    records = [ImageRecord("a", 0, "train"), ImageRecord("b", 0, "train"), ImageRecord("c", 1, "test"),
               ImageRecord("d", 1, "test")]
    split = build_protocol(records, "zero_shot", zero_shot_split="official")
    assert split.train_ids.tolist() == [0, 1]
    assert split.test.record_ids.tolist() == [2, 3]


def test_closed_set_database_is_train_queries_are_test():
    records = _records([0, 1, 2], per_class=6)
    split = build_protocol(records, "closed_set", zero_shot_split="class_halves")
    test = split.test
    queries = test.record_ids[test.query_mask]
    gallery = test.record_ids[test.gallery_mask]
    assert all(records[i].split == "test" for i in queries)
    assert all(records[i].split == "train" for i in gallery)
    assert (test.self_exclusion() == -1).all()
    assert split.train_classes.tolist() == [0, 1, 2]


def test_closed_set_refuses_disjoint_official_classes():
    records = [ImageRecord("a", 0, "train"), ImageRecord("b", 1, "test")]
    with pytest.raises(ValueError, match="zero_shot"):
        build_protocol(records, "closed_set", zero_shot_split="official")


def test_query_gallery_split_is_used_by_both_protocols():
    records = [ImageRecord("t", 0, "train"), ImageRecord("q", 1, "query"), ImageRecord("g", 1, "gallery"),
               ImageRecord("g2", 2, "gallery")]
    for protocol, train in (("zero_shot", [0]), ("closed_set", [0, 2, 3])):  # closed-set: trainval
        split = build_protocol(records, protocol, zero_shot_split="official")
        assert split.train_ids.tolist() == train
        assert split.test.record_ids[split.test.query_mask].tolist() == [1]
        assert split.test.record_ids[split.test.gallery_mask].tolist() == [2, 3]


def test_validation_classes_are_carved_from_training_classes_only():
    records = _records(list(range(10)), per_class=4)
    split = build_protocol(records, "zero_shot", zero_shot_split="class_halves", val_fraction=0.4, seed=3)
    val_classes = set(split.val.labels.tolist())
    train_classes = {records[i].label for i in split.train_ids}
    assert len(val_classes) == 2 and val_classes <= {0, 1, 2, 3, 4}
    assert not val_classes & train_classes
    assert not val_classes & set(split.test.labels.tolist())
    assert not split.val_is_test


def test_closed_set_validation_holds_out_images_not_classes():
    records = _records([0, 1, 2], per_class=10)
    split = build_protocol(records, "closed_set", zero_shot_split="class_halves", val_fraction=0.25, seed=0)
    val_queries = set(split.val.record_ids[split.val.query_mask].tolist())
    assert val_queries and not val_queries & set(split.train_ids.tolist())
    assert set(split.val.labels[split.val.query_mask].tolist()) == {0, 1, 2}
    # held out as training inputs only: the database (targets = test gallery) keeps every image
    gallery = split.test.record_ids[split.test.gallery_mask]
    assert split.target_ids.tolist() == sorted(gallery.tolist())
    assert val_queries <= set(split.target_ids.tolist())
    val_gallery = set(split.val.record_ids[split.val.gallery_mask].tolist())
    assert val_gallery == set(split.train_ids.tolist())  # validation retrieves the kept training images


def test_zero_shot_validation_classes_are_no_targets():
    records = _records(list(range(10)), per_class=4)
    split = build_protocol(records, "zero_shot", zero_shot_split="class_halves", val_fraction=0.4, seed=3)
    assert split.target_ids.tolist() == sorted(split.train_ids.tolist())


def test_unknown_protocol_is_rejected():
    with pytest.raises(ValueError, match="protocol"):
        build_protocol(_records([0, 1], 3), "open_world", zero_shot_split="class_halves")


def test_closed_set_carve_holds_out_the_requested_fraction_overall():
    """In-shop's items have ~5 images: one query per item would hold out ~21%, not 10%. Large classes give up
    exactly their share; small ones fill the overall quota, each keeping a training image."""
    rng = np.random.default_rng(0)
    sizes = np.r_[rng.integers(2, 9, 2000), [100, 100, 1]]  # ~5-image items, two large classes, a singleton
    records = [ImageRecord(f"{c}_{j}.jpg", int(c), "gallery" if j == 0 and c % 2 else "train")
               for c, n in enumerate(sizes) for j in range(n)]
    records.append(ImageRecord("q.jpg", 1, "query"))
    split = build_protocol(records, "closed_set", zero_shot_split="official", val_fraction=0.1, seed=0)
    labels = np.array([r.label for r in records])
    n_inputs = len(split.train_ids) + int(split.val.query_mask.sum())
    assert abs(split.val.query_mask.sum() - round(0.1 * n_inputs)) == 0
    queries = split.val.record_ids[split.val.query_mask]
    assert np.isin(queries, split.target_ids).all()  # held out as inputs only
    assert set(labels[split.train_ids]) == set(labels[split.target_ids])  # every class keeps a training image
    for big in (2000, 2001):
        assert (labels[queries] == big).sum() == 10
    again = build_protocol(records, "closed_set", zero_shot_split="official", val_fraction=0.1, seed=0)
    assert np.array_equal(again.val.record_ids, split.val.record_ids)
