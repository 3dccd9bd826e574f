"""The embedded default dataset: scikit-learn's handwritten digits, shipped inside the package (no download).

1,797 real 8x8 grayscale scans of the digits 0-9 (UCI optdigits test set), upscaled and replicated to RGB so
that every model runs unchanged. Zero-shot trains on digits 0-4 and retrieves among 5-9; closed-set uses a
fixed official split (every fifth image of each class is a test query).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from datamodules.base import RetrievalDataModule
from datamodules.records import ImageRecord

DIGITS_MEAN = (0.19, 0.19, 0.19)
DIGITS_STD = (0.31, 0.31, 0.31)


def load_digit_pixels() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8] scaled to 0..255, labels int64 [N]) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


class DigitsDataModule(RetrievalDataModule):
    name = "digits"
    zero_shot_split = "class_halves"
    url = "(bundled with scikit-learn)"

    def __init__(self, **kwargs) -> None:
        # the same as conf/dataset/digits.yaml (a test compares them)
        kwargs.setdefault("image_size", 32)
        kwargs.setdefault("mean", DIGITS_MEAN)
        kwargs.setdefault("std", DIGITS_STD)
        kwargs.setdefault("eval_batch_size", 256)
        super().__init__(**kwargs)
        self._pixels: np.ndarray | None = None

    def read_records(self) -> list[ImageRecord]:
        self._pixels, labels = load_digit_pixels()
        records = []
        seen: dict[int, int] = {}
        for i, label in enumerate(labels.tolist()):
            seen[label] = seen.get(label, 0) + 1
            split = "test" if seen[label] % 5 == 0 else "train"
            records.append(ImageRecord(path=f"digits://{i}", label=label, split=split))
        return records

    def load_image(self, record_id: int) -> Image.Image:
        if self._pixels is None:
            self._pixels, _ = load_digit_pixels()
        return Image.fromarray(self._pixels[record_id]).convert("RGB")
