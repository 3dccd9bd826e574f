"""Datamodules: one `RetrievalDataModule` subclass per dataset (see `datamodules.base`).

Exports are resolved lazily so that importing `datamodules.records` (or one reader) does not pull in every
reader's dependencies.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RetrievalDataModule": "datamodules.base",
    "DigitsDataModule": "datamodules.digits",
    "CUBDataModule": "datamodules.cub",
    "CarsDataModule": "datamodules.cars",
    "SOPDataModule": "datamodules.sop",
    "InShopDataModule": "datamodules.inshop",
    "ImageRecord": "datamodules.records",
    "DatasetLayoutError": "datamodules.records",
    "AnnotationError": "datamodules.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
