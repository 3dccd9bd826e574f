"""Random-generator state as plain tensors, so checkpoints stay loadable with ``weights_only=True``.

Lightning does not save RNG states; without them a run resumed from ``last.ckpt`` reshuffles, re-flips and
re-draws targets differently from the uninterrupted run and ends with different metrics.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_states() -> dict:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_meta": [str(np_kind), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python_state": torch.tensor(python_state, dtype=torch.int64),
        "python_meta": [int(python_version), python_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, pos, has_gauss, gauss = states["numpy_meta"]
    np.random.set_state((kind, states["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, gauss_py = states["python_meta"]
    random.setstate((version, tuple(int(v) for v in states["python_state"].tolist()), gauss_py))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
