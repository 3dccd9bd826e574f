"""The LightningDataModule every dataset shares: protocol split, transforms, samplers and loaders.

A dataset subclass only implements `read_records()` (parse the official annotation files) and, if its images
are not files, `load_image()`. Batches are dicts ``{"image", "label", "index"}``: ``index`` is the position in
the evaluated set so that embeddings gathered from several DDP ranks can be de-duplicated and re-ordered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from datamodules.errors import UserInputError
from datamodules.loading import AUTO, auto_workers, resolve_flag
from datamodules.paths import expand_path
from datamodules.protocol import EvalSet, ProtocolSplit, build_protocol
from datamodules.records import AnnotationError, ImageRecord
from datamodules.samplers import ClassBalancedSampler, MaxPerClassSampler

log = logging.getLogger(__name__)
SAMPLERS = ("random", "pk")  # dataset.sampler

RESIZE_MODES = ("square", "short_side")
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageReadError(UserInputError, OSError):
    """An image file exists in the annotations but cannot be decoded."""


def open_rgb(path: str | Path, bbox: Sequence[float] | None = None, bbox_source: str | None = None,
             min_side: int | None = None) -> Image.Image:
    """Open any image as RGB (some benchmark files are grayscale or CMYK, or PNGs named .jpg), cropped to bbox.

    A box that overhangs the image edge is clamped to it (annotations are often off by a pixel); a box that
    does not overlap the image at all is an annotation error, reported with the file and line it came from.
    ``min_side`` (``dataset.jpeg_draft``): a JPEG whose region (box or image) is more than twice that size is
    decoded at 1/2, 1/4 or 1/8 scale by libjpeg (`PIL.Image.Image.draft`), keeping its short side >= min_side:
    several times less decoding for the 1024 px photos of SOP, pixels close to but not identical to a full
    decode followed by the resize.
    """
    try:
        with Image.open(path) as img:
            full = img.size
            if min_side and img.format == "JPEG":
                draft_to(img, min_side, bbox)
            scale = (img.size[0] / full[0], img.size[1] / full[1])
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageReadError(
            f"cannot read image {path}: {exc}. Re-extract the archive, delete the file, or set "
            f"dataset.skip_corrupt=true to skip unreadable images"
        ) from exc
    if bbox is not None:
        x1, y1, x2, y2 = (float(v) for v in bbox)
        x1, x2, y1, y2 = x1 * scale[0], x2 * scale[0], y1 * scale[1], y2 * scale[1]  # drafted: smaller image
        w, h = img.size
        if x1 >= w or y1 >= h or x2 <= 0 or y2 <= 0:
            raise AnnotationError(
                bbox_source or path, None,
                f"bounding box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside image {path} of size {w}x{h}",
            )
        x1, y1 = max(0.0, x1), max(0.0, y1)
        x2, y2 = max(x1 + 1, min(x2, w)), max(y1 + 1, min(y2, h))
        img = img.crop((int(x1), int(y1), int(round(x2)), int(round(y2))))
    return img


def draft_to(img: Image.Image, min_side: int, bbox: Sequence[float] | None) -> None:
    """Let libjpeg decode `img` at the smallest 1/2^k scale that keeps its region's short side >= min_side."""
    w, h = img.size
    region = min(float(bbox[2]) - float(bbox[0]), float(bbox[3]) - float(bbox[1])) if bbox is not None else min(w, h)
    factor = min_side / max(1.0, region)
    if factor <= 0.5:
        img.draft(img.mode, (math.ceil(w * factor), math.ceil(h * factor)))


def collate_skipping_missing(samples: list[dict | None]) -> dict:
    """Default collation without the samples that could not be read (``dataset.skip_corrupt=true``)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise ImageReadError(f"every image of a batch of {len(samples)} was unreadable; see the warnings above")
    return default_collate(kept)


class RecordDataset(Dataset):
    """Images `ids` of a datamodule, with labels already mapped (train: 0..C-1; eval: original ids)."""

    def __init__(self, datamodule: RetrievalDataModule, ids: np.ndarray, labels: np.ndarray, transform) -> None:
        self.dm, self.ids, self.labels, self.transform = datamodule, ids, labels, transform
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict | None:
        try:
            image = self.dm.load_image(int(self.ids[i]))
        except ImageReadError as exc:
            if not self.dm.skip_corrupt:
                raise
            self.skipped += 1
            log.warning(f"skipped unreadable image #{self.skipped} of this loader worker: {exc}")
            return None
        return {"image": self.transform(image), "label": int(self.labels[i]), "index": i}


class RetrievalDataModule(L.LightningDataModule):
    """Base for all datasets. Subclasses set `name`, `zero_shot_split`, `url`, and implement `read_records`."""

    name = "base"
    zero_shot_split = "class_halves"  # or "official"
    url = ""

    def __init__(
        self,
        root: str | None = None,
        data_dir: str = "data",
        protocol: str = "zero_shot",
        image_size: int = 224,
        resize_size: int | None = None,
        resize_mode: str = "square",
        interpolation: str = "bilinear",
        hflip: bool = True,
        crop: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        pin_memory: bool | str = False,
        normalize_on_device: bool | str = False,
        jpeg_draft: bool = False,
        max_per_class: int | None = None,
        sampler: str = "random",
        samples_per_class: int = 4,
        val_fraction: float = 0.0,
        seed: int = 0,
        split_seed: int = 0,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__()
        self.skip_corrupt = skip_corrupt
        self.root = expand_path(root) if root else expand_path(data_dir) / self.name
        self.protocol, self.image_size, self.crop = protocol, image_size, crop
        self.resize_size = resize_size or image_size
        if resize_mode not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
            raise ValueError(f"dataset.resize_mode must be one of {RESIZE_MODES} and dataset.interpolation one of "
                             f"{sorted(INTERPOLATIONS)}, got {resize_mode!r}, {interpolation!r}")
        self.resize_mode, self.interpolation, self.hflip = resize_mode, interpolation, hflip
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        if not (num_workers == AUTO or (isinstance(num_workers, int) and num_workers >= 0)):
            raise ValueError(f"dataset.num_workers must be a count >= 0 or auto, got {num_workers!r}")
        self._num_workers = num_workers
        self.pin_memory = resolve_flag(pin_memory, "pin_memory")
        self.normalize_on_device = resolve_flag(normalize_on_device, "normalize_on_device")
        self.jpeg_draft = jpeg_draft
        self.max_per_class, self.val_fraction, self.seed = max_per_class, val_fraction, seed
        if sampler not in SAMPLERS or (sampler == "pk" and max_per_class):
            raise UserInputError(f"dataset.sampler must be one of {SAMPLERS} (pk: P classes x dataset."
                                 f"samples_per_class images per batch, without dataset.max_per_class), got "
                                 f"sampler={sampler!r}, max_per_class={max_per_class}")
        self.sampler, self.samples_per_class = sampler, samples_per_class
        self.split_seed = split_seed  # the validation carve: fixed across training seeds, so seeds are comparable
        self.records: list[ImageRecord] = []
        self.split: ProtocolSplit | None = None

    # ---- what a dataset implements -------------------------------------------------------------------
    def read_records(self) -> list[ImageRecord]:
        raise NotImplementedError

    def load_image(self, record_id: int) -> Image.Image:
        record = self.records[record_id]
        return open_rgb(record.path, record.bbox if self.crop else None, record.bbox_source,
                        min_side=self.resize_size if self.jpeg_draft else None)

    @property
    def num_workers(self) -> int:
        """Loader workers per rank (``auto``: `datamodules.loading.auto_workers` for this node's ranks)."""
        if self._num_workers != AUTO:
            return self._num_workers
        trainer = getattr(self, "trainer", None)
        return auto_workers(trainer.num_devices if trainer is not None else 1)

    # ---- shared machinery -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        self.records = self.read_records()
        if self.crop and not any(r.bbox is not None for r in self.records):
            raise ValueError(f"dataset.crop=true but {self.name} has no bounding boxes; set dataset.crop=false")
        self.split = build_protocol(
            self.records,
            self.protocol,
            zero_shot_split=self.zero_shot_split,
            val_fraction=self.val_fraction,
            seed=self.split_seed,
        )

    @property
    def num_classes(self) -> int:
        """Number of training classes (the classifier size of models trained on this split)."""
        self._require_setup()
        return len(self.split.train_classes)

    @property
    def train_labels(self) -> np.ndarray:
        """Contiguous training labels (0..num_classes-1) aligned with `split.train_ids`."""
        self._require_setup()
        raw = np.array([self.records[i].label for i in self.split.train_ids], dtype=np.int64)
        return np.searchsorted(self.split.train_classes, raw)

    def target_pool(self) -> tuple[np.ndarray, np.ndarray]:
        """(record ids, contiguous labels) of the database images a generative model may be trained to emit.

        The protocol's ``target_ids``: under closed-set they include the validation queries, which are held out
        as training inputs only (`datamodules.protocol`). Labels use the training classes' numbering.
        """
        self._require_setup()
        ids = self.split.target_ids
        raw = np.array([self.records[i].label for i in ids], dtype=np.int64)
        return ids, np.searchsorted(self.split.train_classes, raw)

    def eval_set(self, stage: str) -> EvalSet:
        """The evaluated set behind `val_dataloader` ("val") or `test_dataloader` ("test")."""
        self._require_setup()
        return self.split.val if stage == "val" else self.split.test

    def _resize(self) -> v2.Resize:
        """Square (both sides to ``resize_size``) or short-side (aspect kept) resize, then a crop follows."""
        size = (self.resize_size, self.resize_size) if self.resize_mode == "square" else self.resize_size
        return v2.Resize(size, interpolation=INTERPOLATIONS[self.interpolation], antialias=True)

    def train_transform(self, uint8: bool = False):
        """Random (re)size/crop/flip, then float normalisation; ``uint8``: stop before it (`finish_batch` does it
        on the device: a quarter of the bytes to pin and copy, and no float work on the loader's cores)."""
        crops = self.resize_size != self.image_size or self.resize_mode == "short_side"
        return v2.Compose(
            [
                v2.PILToTensor(),
                self._resize(),
                v2.RandomCrop(self.image_size) if crops else v2.Identity(),
                v2.RandomHorizontalFlip() if self.hflip else v2.Identity(),
                *([] if uint8 else self._to_normalized_float()),
            ]
        )

    def eval_transform(self, uint8: bool = False):
        return v2.Compose(
            [
                v2.PILToTensor(),
                self._resize(),
                v2.CenterCrop(self.image_size),
                *([] if uint8 else self._to_normalized_float()),
            ]
        )

    def _to_normalized_float(self) -> list:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning's hook for the training/evaluation loops' batches, once on the device: `finish_batch`."""
        if isinstance(batch, dict) and "image" in batch:
            batch["image"] = self.finish_batch(batch["image"])
        return batch

    def finish_batch(self, images: torch.Tensor) -> torch.Tensor:
        """A batch from the training/evaluation loaders as the model takes it: uint8 batches (made with
        ``normalize_on_device``) become normalised float32 where they are (the GPU); float batches pass."""
        if images.dtype != torch.uint8:
            return images
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    @property
    def num_records(self) -> int:
        """Number of images of the dataset, every split (record ids are 0..num_records-1)."""
        self._require_setup()
        return len(self.records)

    def record_labels(self, record_ids: np.ndarray | None = None) -> np.ndarray:
        """Original class ids of `record_ids` (default: every record)."""
        self._require_setup()
        ids = np.arange(len(self.records)) if record_ids is None else np.asarray(record_ids)
        return np.array([self.records[int(i)].label for i in ids], dtype=np.int64)

    def record_dataset(self, record_ids: np.ndarray | None = None, transform=None) -> RecordDataset:
        """Images `record_ids` (default: every record) with their original labels and the evaluation transform
        (or `transform`): what a model embeds or tokenizes outside the training loop."""
        ids = np.arange(self.num_records) if record_ids is None else np.asarray(record_ids, dtype=np.int64)
        return RecordDataset(self, ids, self.record_labels(ids), transform or self.eval_transform())

    def inference_loader(self, dataset: Dataset) -> DataLoader:
        """An in-order loader over `dataset` at the evaluation batch size, with this dataset's workers."""
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs())

    def train_dataset(self, transform=None) -> RecordDataset:
        self._require_setup()
        return RecordDataset(self, self.split.train_ids, self.train_labels, transform or self.train_transform())

    def eval_dataset(self, stage: str, transform=None) -> RecordDataset:
        s = self.eval_set(stage)
        return RecordDataset(self, s.record_ids, s.labels, transform or self.eval_transform())

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1 and trainer.is_global_zero:
            log.warning(f"DDP: each of the {trainer.world_size} ranks loads dataset.batch_size={self.batch_size} "
                        f"images per step, a global batch of {trainer.world_size * self.batch_size}. To keep a "
                        f"recipe's global batch G, set dataset.batch_size=G/{trainer.world_size} (README, 'Batch "
                        f"size under DDP').")
        dataset = self.train_dataset(self.train_transform(uint8=self.normalize_on_device))
        if self.sampler == "pk":
            return self._class_balanced_loader(dataset, trainer)
        sampler = (
            MaxPerClassSampler(dataset.labels, self.max_per_class, self.seed) if self.max_per_class else None
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=len(dataset) > self.batch_size,
            **self._loader_kwargs(),
        )

    def _class_balanced_loader(self, dataset, trainer) -> DataLoader:
        """``dataset.sampler=pk``: P x K batches, split over the ranks by the sampler itself."""
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ClassBalancedSampler(dataset.labels, self.batch_size, self.samples_per_class, self.seed, world,
                                       rank)
        if rank == 0:
            log.info(f"P x K batches: {sampler.p} classes x {sampler.k} images, {sampler.batches_per_rank} per rank "
                     f"and epoch; {sampler.short_classes} of {sampler.num_classes} classes have fewer than "
                     f"{sampler.k} images and are drawn with replacement")
            if world > 1 and not sampler.ranks_disjoint:
                log.warning(f"P x K batches: {sampler.num_classes} classes cannot give {world} ranks "
                            f"{sampler.p} different classes each in one step; ranks may share classes")
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, stage: str) -> DataLoader:
        return self.inference_loader(self.eval_dataset(stage, self.eval_transform(uint8=self.normalize_on_device)))

    def _loader_kwargs(self) -> dict:
        return {
            "collate_fn": collate_skipping_missing,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }

    def _require_setup(self) -> None:
        if self.split is None:
            self.setup()

    def describe(self) -> dict:
        """What a result must record to be comparable: dataset, protocol, split sizes."""
        self._require_setup()
        return {
            "dataset": self.name,
            "protocol": self.protocol,
            "train_images": int(len(self.split.train_ids)),
            "train_targets": int(len(self.split.target_ids)),
            "train_classes": self.num_classes,
            "test_queries": int(self.split.test.query_mask.sum()),
            "test_gallery": int(self.split.test.gallery_mask.sum()),
            "val_is_test": self.split.val_is_test,
            "val_fraction_realised": self.realised_val_fraction(),
        }

    def realised_val_fraction(self) -> float:
        """The share of the training images (inputs before the carve) that validation took: validation queries
        under closed-set (they leave the inputs only), validation images under zero-shot; 0 without a carve."""
        split = self.split
        if split.val_is_test:
            return 0.0
        held = int(split.val.query_mask.sum()) if self.protocol == "closed_set" else len(split.val)
        return round(held / (len(split.train_ids) + held), 4)
