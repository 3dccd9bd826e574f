"""Class-balanced P x K batches (``dataset.sampler=pk``): P classes x K images, split over ranks with disjoint
classes at each step, different every epoch, with replacement only for classes that are too small."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from datamodules.errors import UserInputError
from datamodules.samplers import ClassBalancedSampler
from tests.helpers import REPO

LABELS = np.repeat(np.arange(12), [6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 1, 3])  # two classes smaller than K=4


def rank_batches(sampler: ClassBalancedSampler) -> list[list[int]]:
    flat = list(sampler)
    size = sampler.p * sampler.k
    assert len(flat) == len(sampler) and len(flat) % size == 0
    return [flat[i:i + size] for i in range(0, len(flat), size)]


def test_every_batch_is_p_classes_times_k_images_and_small_classes_repeat():
    sampler = ClassBalancedSampler(LABELS, batch_size=12, samples_per_class=4, seed=0)
    assert (sampler.p, sampler.k, sampler.short_classes) == (3, 4, 2)
    for batch in rank_batches(sampler):
        counts = Counter(LABELS[batch].tolist())
        assert len(counts) == 3 and set(counts.values()) == {4}
        for label in counts:  # images repeat only within a class that has fewer than K
            positions = [i for i in batch if LABELS[i] == label]
            if label < 10:
                assert len(set(positions)) == 4
            else:
                assert len(set(positions)) <= {10: 1, 11: 3}[label]


def test_two_ranks_get_disjoint_classes_at_every_step_and_new_batches_every_epoch():
    ranks = [ClassBalancedSampler(LABELS, 12, 4, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    assert ranks[0].ranks_disjoint and len(ranks[0]) == len(ranks[1])
    epoch0 = [rank_batches(s) for s in ranks]
    for a, b in zip(*epoch0, strict=True):
        assert not set(LABELS[a]) & set(LABELS[b])
    for s in ranks:
        s.set_epoch(1)
    epoch1 = [rank_batches(s) for s in ranks]
    assert epoch0 != epoch1
    again = ClassBalancedSampler(LABELS, 12, 4, seed=1, num_replicas=2, rank=0)
    assert rank_batches(again) == epoch0[0]  # deterministic given seed and epoch


@pytest.mark.parametrize(("batch_size", "k", "match"), [(10, 4, "multiple of"), (52, 4, "holds 13 classes"),
                                                          (4, 4, "holds 1 classes")])
def test_impossible_batches_name_the_keys(batch_size, k, match):
    with pytest.raises(UserInputError, match=match):
        ClassBalancedSampler(LABELS, batch_size, k)


@pytest.mark.slow
def test_lightning_ddp_keeps_the_batches_whole_and_disjoint(tmp_path):
    """Lightning must not wrap the sampler: each gloo rank trains on its own P x K batches."""
    proc = subprocess.run([sys.executable, "tests/scripts/ddp_pk_batches.py", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(s) for s in seen] == [6, 6]  # 2 epochs x 3 steps on each rank
    for a, b in zip(*seen, strict=True):
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
        for batch in (a, b):
            assert sorted(Counter(batch["label"]).values()) == [2, 2, 2, 2]  # P=4 classes x K=2
        assert not set(a["label"]) & set(b["label"])
    first, second = ([b["index"] for b in seen[0] if b["epoch"] == e] for e in (0, 1))
    assert first != second
