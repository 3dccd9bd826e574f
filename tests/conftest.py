"""Test-wide settings (CPU only, quiet, offline) and shared fixtures: tiny fake copies of the benchmark
datasets in their official layouts (see `tests.fixtures.fake_datasets`), each in a fresh temporary folder."""

import os
from pathlib import Path

import pytest
import torch

from tests.fixtures.fake_datasets import make_fake_cars, make_fake_cub, make_fake_inshop, make_fake_sop

# One intra-op thread per process: tests spawn DDP ranks and CLI subprocesses on a 2-core machine, and
# oversubscribed OpenMP threads spin-wait -- measured 7x slower for a small training run than one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_cub(tmp_path: Path) -> Path:
    """Root of a fake CUB-200-2011 (4 classes x 3 images, inside CUB_200_2011/)."""
    return make_fake_cub(tmp_path / "cub")


@pytest.fixture
def fake_cars(tmp_path: Path) -> Path:
    """Root of a fake CARS196 in the cars_annos.mat + car_ims/ form (4 classes x 3 images)."""
    return make_fake_cars(tmp_path / "car")


@pytest.fixture
def fake_cars_devkit(tmp_path: Path) -> Path:
    """Root of a fake CARS196 in the devkit form (cars_train/, cars_test/, devkit/, labelled test annos)."""
    return make_fake_cars(tmp_path / "car", form="devkit")


@pytest.fixture
def fake_sop(tmp_path: Path) -> Path:
    """Root of a fake Stanford Online Products (classes 1-2 train, 3-4 test, 3 images each)."""
    return make_fake_sop(tmp_path / "sop")


@pytest.fixture
def fake_inshop(tmp_path: Path) -> Path:
    """Root of a fake In-shop (4 items x 3 images: 2 train items, 2 query/gallery items)."""
    return make_fake_inshop(tmp_path / "isc")


@pytest.fixture
def fake_data_dir(tmp_path: Path) -> Path:
    """A `paths.data_dir` holding all four fake datasets under their default names (cub, car, sop, isc)."""
    data = tmp_path / "data"
    make_fake_cub(data / "cub")
    make_fake_cars(data / "car")
    make_fake_sop(data / "sop")
    make_fake_inshop(data / "isc")
    return data
