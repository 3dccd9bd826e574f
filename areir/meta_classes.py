"""Meta-class assignment: each ensemble member sees the C training classes merged into M random groups.

Member e is trained to classify an image into the meta-class ``assignment[e, label]``. Partitions are balanced
(every group gets floor(C/M) or ceil(C/M) classes) and independent across members, drawn from one seeded
generator, so a run is reproducible from its seed; the model stores the array in its state dict so that a
checkpoint always carries the partition it was trained with.

Two classes whose meta-labels agree in *every* member ("collide") are indistinguishable to the ensemble's training
signal. With M**E far above C that is rare, but for small ensembles it happens, so `count_collisions` reports it and
`collision_free_assignment` removes it (see its docstring for the method).
"""

from __future__ import annotations

import numpy as np

ASSIGNMENTS = ("random", "collision_free", "identity")


def _check_sizes(num_classes: int, num_groups: int, num_members: int) -> None:
    if num_classes < 1 or num_groups < 1 or num_members < 1:
        raise ValueError(f"need C, M, E >= 1, got C={num_classes}, M={num_groups}, E={num_members}")
    if num_groups > num_classes:
        raise ValueError(
            f"model.meta_classes={num_groups} exceeds the {num_classes} training classes: some meta-classes would "
            f"be empty. Set model.meta_classes <= {num_classes}."
        )


def balanced_partition(num_classes: int, num_groups: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [C]: group of every class; a random permutation dealt round-robin, so sizes differ by at most one."""
    groups = np.empty(num_classes, dtype=np.int64)
    groups[rng.permutation(num_classes)] = np.arange(num_classes) % num_groups
    return groups


def random_assignment(num_classes: int, num_groups: int, num_members: int, seed: int) -> np.ndarray:
    """int64 [E, C]: an independent balanced partition per member, deterministic given `seed`."""
    _check_sizes(num_classes, num_groups, num_members)
    rng = np.random.default_rng(seed)
    return np.stack([balanced_partition(num_classes, num_groups, rng) for _ in range(num_members)])


def code_groups(assignment: np.ndarray) -> np.ndarray:
    """Number of classes sharing each distinct code (column of `assignment`)."""
    _, counts = np.unique(np.asarray(assignment).T, axis=0, return_counts=True)
    return counts


def count_collisions(assignment: np.ndarray) -> int:
    """Number of unordered class pairs whose meta-labels agree in every member."""
    counts = code_groups(assignment).astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def is_balanced(assignment: np.ndarray, num_groups: int) -> bool:
    """Every row is a partition of the classes into `num_groups` groups of floor/ceil(C/M) classes."""
    assignment = np.asarray(assignment)
    if assignment.ndim != 2 or assignment.min() < 0 or assignment.max() >= num_groups:
        return False
    c = assignment.shape[1]
    lo, hi = c // num_groups, -(-c // num_groups)
    sizes = np.stack([np.bincount(row, minlength=num_groups) for row in assignment])
    return bool(((sizes >= lo) & (sizes <= hi)).all())


def _colliding_classes(assignment: np.ndarray) -> np.ndarray:
    """Classes whose code is shared with an earlier class (one per extra member of each code group)."""
    _, first, inverse = np.unique(assignment.T, axis=0, return_index=True, return_inverse=True)
    return np.flatnonzero(first[inverse.reshape(-1)] != np.arange(assignment.shape[1]))


def _digit_construction(num_classes: int, num_groups: int, num_members: int, rng: np.random.Generator) -> np.ndarray:
    """A collision-free balanced assignment that exists whenever M**E >= C (the fallback of the repair search).

    Class i gets c_0 = i mod M and c_e = (i + floor(i / M**e)) mod M. Each row is balanced (whole blocks of
    constant floor(i/M**e) hold every residue equally often and the last block is a run of consecutive residues)
    and (c_e - c_0) mod M is the e-th base-M digit of i, so codes are unique. Classes, groups and members are then
    shuffled, which keeps both properties.
    """
    i = np.arange(num_classes, dtype=np.int64)
    rows = [i % num_groups] + [(i + i // num_groups**e) % num_groups for e in range(1, num_members)]
    codes = np.stack(rows)[:, rng.permutation(num_classes)]
    codes = np.stack([rng.permutation(num_groups)[row] for row in codes])
    return codes[rng.permutation(num_members)]


def collision_free_assignment(
    num_classes: int, num_groups: int, num_members: int, seed: int, max_steps: int = 20_000
) -> np.ndarray:
    """A balanced assignment in which every class has a unique code across members.

    Method: start from `random_assignment(seed)` and repair it by swaps. A swap exchanges the meta-labels of two
    classes inside one member, which keeps that member's partition balanced. Each step takes a colliding class,
    swaps it with a random class of another group in a random member, and keeps the swap unless it increases the
    collision count (sideways moves are kept so the search does not stall). Collisions are rare to begin with, so
    few swaps are needed and the result stays close to an ordinary random draw. If `max_steps` swaps do not
    suffice, a seeded explicit construction (`_digit_construction`) is returned instead. Impossible when
    M**E < C (there are fewer codes than classes): that raises.
    """
    _check_sizes(num_classes, num_groups, num_members)
    if num_groups**num_members < num_classes:
        raise ValueError(
            f"collision-free assignment impossible: M**E = {num_groups}**{num_members} = "
            f"{num_groups**num_members} < {num_classes} classes. Increase model.members or model.meta_classes, "
            f"or use model.assignment=random."
        )
    assignment = random_assignment(num_classes, num_groups, num_members, seed)
    rng = np.random.default_rng((seed, 1))
    collisions = count_collisions(assignment)
    for _ in range(max_steps):
        if collisions == 0:
            return assignment
        a = int(rng.choice(_colliding_classes(assignment)))
        e = int(rng.integers(num_members))
        others = np.flatnonzero(assignment[e] != assignment[e, a])
        if len(others) == 0:  # M == 1: no swap can separate anything
            break
        b = int(rng.choice(others))
        assignment[e, [a, b]] = assignment[e, [b, a]]
        new = count_collisions(assignment)
        if new > collisions:
            assignment[e, [a, b]] = assignment[e, [b, a]]
        else:
            collisions = new
    if collisions == 0:
        return assignment
    return _digit_construction(num_classes, num_groups, num_members, rng)


def build_assignment(method: str, num_classes: int, num_groups: int, num_members: int, seed: int) -> np.ndarray:
    """Dispatch on ``model.assignment``."""
    if method == "random":
        return random_assignment(num_classes, num_groups, num_members, seed)
    if method == "collision_free":
        return collision_free_assignment(num_classes, num_groups, num_members, seed)
    if method == "identity":  # the control: every member classifies every training class (no meta-classes)
        if num_groups != num_classes:
            raise ValueError(f"model.assignment=identity: every member classifies all {num_classes} training classes, "
                             f"so model.meta_classes must be {num_classes}, not {num_groups}")
        return np.tile(np.arange(num_classes), (num_members, 1))
    raise ValueError(f"model.assignment must be one of {ASSIGNMENTS}, got {method!r}")
