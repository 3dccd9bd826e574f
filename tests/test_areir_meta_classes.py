"""Meta-class partitions: balanced, seeded, one group per class and member; collision counting and removal."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from areir.meta_classes import (
    _digit_construction,
    balanced_partition,
    build_assignment,
    collision_free_assignment,
    count_collisions,
    is_balanced,
    random_assignment,
)


def brute_force_collisions(assignment: np.ndarray) -> int:
    return sum(
        bool((assignment[:, a] == assignment[:, b]).all())
        for a, b in itertools.combinations(range(assignment.shape[1]), 2)
    )


@pytest.mark.parametrize("c,m", [(10, 3), (100, 12), (7, 7), (13, 1), (196 // 2, 12)])
def test_partition_is_balanced_and_covers_every_class(c: int, m: int) -> None:
    groups = balanced_partition(c, m, np.random.default_rng(0))
    assert groups.shape == (c,) and groups.min() >= 0 and groups.max() < m
    sizes = np.bincount(groups, minlength=m)
    assert sizes.sum() == c and set(sizes.tolist()) <= {c // m, -(-c // m)}


def test_assignment_shape_and_every_member_balanced() -> None:
    a = random_assignment(100, 12, 48, seed=3)
    assert a.shape == (48, 100) and a.dtype == np.int64
    assert is_balanced(a, 12)
    # members are independent draws, not copies
    assert len({row.tobytes() for row in a}) == 48


def test_assignment_is_seeded() -> None:
    assert np.array_equal(random_assignment(50, 5, 8, seed=1), random_assignment(50, 5, 8, seed=1))
    assert not np.array_equal(random_assignment(50, 5, 8, seed=1), random_assignment(50, 5, 8, seed=2))
    assert np.array_equal(collision_free_assignment(9, 3, 2, seed=4), collision_free_assignment(9, 3, 2, seed=4))


def test_is_balanced_rejects_unbalanced() -> None:
    assert not is_balanced(np.array([[0, 0, 0, 1]]), 2)
    assert not is_balanced(np.array([[0, 1, 2, 1]]), 2)  # value out of range
    assert is_balanced(np.array([[0, 1, 0, 1]]), 2)


@pytest.mark.parametrize("c,m,e,seed", [(12, 2, 3, 0), (30, 3, 2, 1), (20, 4, 2, 2), (8, 2, 1, 3), (50, 12, 2, 4)])
def test_collision_count_matches_brute_force(c: int, m: int, e: int, seed: int) -> None:
    a = random_assignment(c, m, e, seed)
    expected = brute_force_collisions(a)
    assert count_collisions(a) == expected
    assert expected > 0 or (c, m, e) == (50, 12, 2)  # the small cases really do collide


@pytest.mark.parametrize("c,m,e", [(9, 3, 2), (16, 2, 4), (100, 12, 2), (98, 2, 7), (5, 2, 3), (200, 3, 5)])
def test_collision_free_has_unique_codes_and_stays_balanced(c: int, m: int, e: int) -> None:
    for seed in range(3):
        a = collision_free_assignment(c, m, e, seed)
        assert a.shape == (e, c) and is_balanced(a, m)
        assert count_collisions(a) == 0 == brute_force_collisions(a)


@pytest.mark.parametrize("c,m,e", [(9, 3, 2), (16, 2, 4), (17, 4, 3), (100, 10, 2)])
def test_explicit_construction_is_collision_free_and_balanced(c: int, m: int, e: int) -> None:
    a = _digit_construction(c, m, e, np.random.default_rng(0))
    assert is_balanced(a, m) and count_collisions(a) == 0


def test_impossible_requests_raise() -> None:
    with pytest.raises(ValueError, match="impossible"):
        collision_free_assignment(10, 3, 2, seed=0)  # 3**2 = 9 codes < 10 classes
    with pytest.raises(ValueError, match="exceeds"):
        random_assignment(5, 6, 2, seed=0)
    with pytest.raises(ValueError, match="assignment must be one of"):
        build_assignment("nearest", 10, 2, 2, 0)


def test_identity_assignment_is_every_member_classifying_every_class():
    from areir.meta_classes import build_assignment

    labels = build_assignment("identity", 6, 6, 3, seed=0)
    assert labels.shape == (3, 6) and (labels == np.arange(6)).all()
    with pytest.raises(ValueError, match="meta_classes must be 6"):
        build_assignment("identity", 6, 4, 3, seed=0)
