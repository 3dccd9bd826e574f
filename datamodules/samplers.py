"""Training samplers beyond plain shuffling: a per-class cap (`MaxPerClassSampler`) and class-balanced P x K
batches (`ClassBalancedSampler`, ``dataset.sampler=pk``) for pair and triplet losses.

Both are deterministic given (seed, epoch) and change with `set_epoch`, which Lightning calls every epoch.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DistributedSampler, Sampler

from datamodules.errors import UserInputError
from datamodules.protocol import positions_by_class


class MaxPerClassSampler(Sampler[int]):
    """Each epoch, a fresh random subset of at most `max_per_class` images of every class, shuffled.

    Caps the influence of huge classes (the AREIR recipe draws <= 300 images per class per epoch); the draw
    changes with `set_epoch` so that every image is seen over the run. Deterministic given seed and epoch.
    """

    def __init__(self, labels: np.ndarray, max_per_class: int, seed: int = 0) -> None:
        self.labels, self.max_per_class, self.seed, self.epoch = np.asarray(labels), max_per_class, seed, 0
        self._by_class = positions_by_class(self.labels)
        self._length = sum(min(len(m), max_per_class) for m in self._by_class)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        chosen = [rng.permutation(m)[: self.max_per_class] for m in self._by_class]
        yield from rng.permutation(np.concatenate(chosen)).tolist()


class ClassBalancedSampler(DistributedSampler):
    """Batches of P classes x K images (``batch_size = P * K``), for losses that need positives in the batch.

    Every epoch the classes are permuted and cut into groups of P distinct classes; each group is one batch with
    K images per class (drawn without replacement, or with replacement for a class of fewer than K images). Under
    DDP the batches of one step come from the same permutation and go one to each rank, so the ranks of a step
    see disjoint classes (and images) when there are at least P x ranks classes. An epoch has as many batches as
    the training images fill (at least one per rank).

    It splits the work over the ranks itself; it is a `DistributedSampler` only so that Lightning leaves it as is
    (Lightning would otherwise wrap it and deal its indices out one by one, breaking the P x K groups).
    Cost: O(classes) per batch drawn, once per epoch on each rank (SOP: 11,318 classes).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        labels = np.asarray(labels)
        super().__init__(labels, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed, drop_last=True)
        if samples_per_class < 1 or batch_size % samples_per_class:
            raise UserInputError(f"dataset.sampler=pk: dataset.batch_size={batch_size} must be a multiple of "
                                 f"dataset.samples_per_class={samples_per_class} (P classes x K images per batch)")
        self.k, self.p = samples_per_class, batch_size // samples_per_class
        self._by_class = positions_by_class(labels)
        if self.p < 2 or len(self._by_class) < self.p:
            raise UserInputError(f"dataset.sampler=pk: a batch of {batch_size} with dataset.samples_per_class="
                                 f"{self.k} holds {self.p} classes, but it needs 2 to {len(self._by_class)} (the "
                                 f"training classes): change dataset.batch_size or dataset.samples_per_class")
        self.num_classes = len(self._by_class)
        self.short_classes = sum(len(m) < self.k for m in self._by_class)
        self.batches_per_rank = max(1, len(labels) // (batch_size * num_replicas))
        groups = len(self._by_class) // self.p  # batches one permutation of the classes gives
        # the batches of one step from one permutation (disjoint classes across ranks) when the classes suffice
        self.ranks_disjoint = groups >= num_replicas
        self._per_permutation = groups // num_replicas * num_replicas if self.ranks_disjoint else groups

    def __len__(self) -> int:
        return self.batches_per_rank * self.p * self.k

    def batches(self) -> list[np.ndarray]:
        """Every batch of this epoch, all ranks' (rank r takes batches r, r + ranks, ...)."""
        rng = np.random.default_rng((self.seed, self.epoch))
        needed = self.batches_per_rank * self.num_replicas
        out: list[np.ndarray] = []
        while len(out) < needed:
            classes = rng.permutation(len(self._by_class))
            for g in range(min(self._per_permutation, needed - len(out))):
                group = classes[g * self.p:(g + 1) * self.p]
                out.append(np.concatenate([self._draw(rng, self._by_class[c]) for c in group]))
        return out

    def _draw(self, rng: np.random.Generator, members: np.ndarray) -> np.ndarray:
        return rng.choice(members, self.k, replace=len(members) < self.k)

    def __iter__(self):
        for batch in self.batches()[self.rank::self.num_replicas]:
            yield from batch.tolist()
