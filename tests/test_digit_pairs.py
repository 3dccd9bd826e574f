"""The embedded benchmark is a deterministic function of its settings, cached, and split as documented."""

from __future__ import annotations

import numpy as np

from datamodules.digit_pairs import (
    CLASS_OF_NUMBER,
    DigitPairsDataModule,
    cached_dataset,
    number_of_class,
    render_dataset,
)


def test_rendering_is_deterministic_and_seeded():
    a_images, a_labels = render_dataset(2, render_seed=0)
    b_images, b_labels = render_dataset(2, render_seed=0)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)
    assert a_images.shape == (200, 32, 32, 3) and a_images.dtype == np.uint8
    assert not np.array_equal(a_images, render_dataset(2, render_seed=1)[0])
    assert not np.array_equal(a_images[0], a_images[1])  # two views of one class differ


def test_cache_returns_the_rendering_and_survives_corruption(tmp_path):
    images, labels = cached_dataset(tmp_path, 2, 0)
    (cache,) = tmp_path.glob("digit_pairs_*.npz")
    again, _ = cached_dataset(tmp_path, 2, 0)
    assert np.array_equal(images, again)
    cache.write_bytes(b"garbage")
    rerendered, _ = cached_dataset(tmp_path, 2, 0)
    assert np.array_equal(images, rerendered)


def test_classes_are_numbers_and_splits_follow_the_protocols(tmp_path):
    assert sorted(number_of_class(c) for c in range(100)) == list(range(100))
    assert number_of_class(int(CLASS_OF_NUMBER[42])) == 42
    dm = DigitPairsDataModule(data_dir=str(tmp_path), images_per_class=5, protocol="zero_shot", val_fraction=0)
    dm.setup()
    train = {dm.records[i].label for i in dm.split.train_ids}
    test = set(dm.split.test.labels.tolist())
    assert train == set(range(50)) and test == set(range(50, 100))
    # the zero-shot training numbers contain every digit in both positions (the permutation mixes them)
    numbers = [number_of_class(c) for c in train]
    assert {n // 10 for n in numbers} == set(range(10)) and {n % 10 for n in numbers} == set(range(10))
    closed = DigitPairsDataModule(data_dir=str(tmp_path), images_per_class=5, protocol="closed_set", val_fraction=0)
    closed.setup()
    queries = closed.split.test.record_ids[closed.split.test.query_mask]
    assert len(queries) == 100 and set(closed.split.test.labels.tolist()) == set(range(100))
