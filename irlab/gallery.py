"""What a search runs against: a gallery as a list of items (a dataset split's gallery records, or the image files
of a folder), and the dataset that reads them with the evaluation transform, listing the unreadable ones."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import RetrievalDataModule, open_rgb
from datamodules.errors import MissingFileError, UserInputError
from datamodules.paths import expand_path

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("test", "val", "train")  # gallery=<split>: that split's gallery images of the dataset


@dataclass(frozen=True)
class GalleryItem:
    name: str  # what is printed and matched: a file's resolved path, or a dataset record's path
    record_id: int | None = None  # the dataset record it is, if it is one
    label: int | None = None

    def as_json(self) -> dict:
        return asdict(self)


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise MissingFileError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def gallery_items(spec: str, dm: RetrievalDataModule) -> list[GalleryItem]:
    """``test`` / ``val`` (that evaluation set's gallery), ``train`` (the training images), or a folder."""
    if spec in SPLITS:
        ids = dm.split.train_ids if spec == "train" else dm.eval_set(spec).record_ids[dm.eval_set(spec).gallery_mask]
        labels = dm.record_labels(ids)
        return [GalleryItem(str(dm.records[i].path), int(i), int(label)) for i, label in zip(ids, labels, strict=True)]
    folder = expand_path(spec)
    if not folder.is_dir():
        raise UserInputError(f"gallery={spec}: neither a folder nor one of {SPLITS}")
    return [GalleryItem(str(f.resolve())) for f in image_files(folder)]


def item_image(item: GalleryItem, dm: RetrievalDataModule) -> Image.Image:
    return dm.load_image(item.record_id) if item.record_id is not None else open_rgb(item.name)


class ItemImages(Dataset):
    """The items' images with `transform`. An unreadable one raises (`datamodules.errors.ImageReadError`: one
    message naming the file) or, with ``skip_unreadable``, yields None: the loader's collation drops it and
    `map_images(with_index=True)` tells which were read (the index builder lists them)."""

    def __init__(self, items: list[GalleryItem], dm: RetrievalDataModule, transform,
                 skip_unreadable: bool = False) -> None:
        self.items, self.dm, self.transform, self.skip_unreadable = items, dm, transform, skip_unreadable

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict | None:
        try:
            image = item_image(self.items[i], self.dm)
        except (OSError, ValueError) as exc:  # ImageReadError, truncated or missing files
            if not self.skip_unreadable:
                raise
            log.warning(f"unreadable image skipped: {self.items[i].name} ({exc})")
            return None
        return {"image": self.transform(image), "index": i}
