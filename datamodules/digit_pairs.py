"""The embedded benchmark: two-digit numbers rendered from scikit-learn's handwritten digits, with nuisances.

Plain 8x8 digits are so easy that raw pixels retrieve them (R@1 > 0.9 before any training), so they cannot show
what training does. Here a class is a two-digit number "ab" (100 classes), and every image shows a random scan
of digit a next to a random scan of digit b (1,797 real scans, UCI optdigits, shipped inside scikit-learn), each
with its own scale, rotation, stroke width, position and colour, on a coloured background with clutter and noise.
Retrieval must learn to read both digits and ignore everything else; zero-shot retrieval of unseen numbers is
possible only by reading digits, which the training numbers teach (every digit appears in both positions).

Classes are numbered through a fixed permutation of the 100 numbers, so that "the first half of the class ids"
(the zero-shot training classes, as for CUB/CARS) is a mix of numbers rather than 00-49. Closed-set: every
fifth image of a class is a test query, the rest the database. Images are a deterministic function of
(``render_seed``, image index): generated in a few seconds on first use and cached as one ``.npz`` under
``<data_dir>/digit_pairs/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from datamodules.base import RetrievalDataModule
from datamodules.digits import load_digit_pixels
from datamodules.records import ImageRecord

log = logging.getLogger(__name__)

RENDER_VERSION = 4  # bump when the rendering changes: the cache key includes it
CANVAS = 32
NUM_CLASSES = 100
# the class id of number n is CLASS_OF_NUMBER[n]; fixed forever (changing it changes every split)
CLASS_OF_NUMBER = np.random.default_rng(20261201).permutation(NUM_CLASSES)
PAIR_MEAN = (0.45, 0.45, 0.45)
PAIR_STD = (0.25, 0.25, 0.25)


def number_of_class(label: int) -> int:
    """The two-digit number shown by images of class `label`."""
    return int(np.flatnonzero(CLASS_OF_NUMBER == label)[0])


def _glyph(scan: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One 8x8 scan as an alpha mask: random height 14-19 px, rotation +-10 degrees, stroke thinner or bolder."""
    mask = Image.fromarray(scan).convert("L")
    height = int(rng.integers(14, 20))
    width = max(6, int(round(height * rng.uniform(0.7, 1.0))))
    mask = mask.resize((width, height), Image.BILINEAR)
    stroke = rng.integers(0, 3)
    if stroke == 1:
        mask = mask.filter(ImageFilter.MaxFilter(3))
    elif stroke == 2:
        mask = mask.filter(ImageFilter.MinFilter(3)).point(lambda v: min(255, int(v * 1.6)))
    return mask.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, expand=True)


def _luminance(colour: np.ndarray) -> float:
    return float(np.dot(colour, (0.299, 0.587, 0.114)))


def _random_colour(rng: np.random.Generator, luminance: tuple[float, float]) -> np.ndarray:
    """A random colour (any hue) whose luminance lies in the given range."""
    for _ in range(64):
        colour = rng.integers(0, 256, size=3)
        if luminance[0] <= _luminance(colour) <= luminance[1]:
            return colour
    return np.full(3, int(sum(luminance) / 2))


def render_pair(scan_a: np.ndarray, scan_b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [32, 32, 3]: scan_a left, scan_b right, on a coloured gradient with thin clutter lines and noise."""
    # polarity is fixed (light digits on a darker background of any hue): colour and clutter are the nuisances
    background = _random_colour(rng, (0, 110))
    gradient = np.linspace(-1, 1, CANVAS)[None, :, None] * rng.uniform(-30, 30, size=3)
    canvas = np.clip(background + gradient + np.zeros((CANVAS, CANVAS, 3)), 0, 255)
    for _ in range(int(rng.integers(1, 4))):  # clutter: thin translucent strokes, horizontal or vertical
        x0, y0 = rng.integers(0, CANVAS, size=2)
        length = int(rng.integers(4, 16))
        box = (slice(y0, y0 + 1), slice(x0, x0 + length)) if rng.random() < 0.5 else \
            (slice(y0, y0 + length), slice(x0, x0 + 1))
        canvas[box] = 0.5 * canvas[box] + 0.5 * rng.integers(0, 256, size=3)
    image = Image.fromarray(canvas.astype(np.uint8))
    for scan, (x_lo, x_hi) in ((scan_a, (0, 4)), (scan_b, (15, 19))):
        mask = _glyph(scan, rng)
        colour = tuple(int(c) for c in _random_colour(rng, (_luminance(background) + 80, 255)))
        x = int(rng.integers(x_lo, x_hi))
        y = int(rng.integers(0, max(1, CANVAS - mask.size[1] + 1)))
        image.paste(Image.new("RGB", mask.size, colour), (x, y), mask)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 10), size=(CANVAS, CANVAS, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_dataset(images_per_class: int, render_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int64 [N]), class-major order, deterministic in both arguments."""
    scans, digit = load_digit_pixels()
    by_digit = [np.flatnonzero(digit == d) for d in range(10)]
    images = np.empty((NUM_CLASSES * images_per_class, CANVAS, CANVAS, 3), dtype=np.uint8)
    labels = np.empty(NUM_CLASSES * images_per_class, dtype=np.int64)
    for label in range(NUM_CLASSES):
        a, b = divmod(number_of_class(label), 10)
        for j in range(images_per_class):
            i = label * images_per_class + j
            rng = np.random.default_rng((render_seed, RENDER_VERSION, i))
            images[i] = render_pair(scans[rng.choice(by_digit[a])], scans[rng.choice(by_digit[b])], rng)
            labels[i] = label
    return images, labels


def cached_dataset(cache_dir: Path, images_per_class: int, render_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`render_dataset`, read from / written to ``cache_dir`` (atomic write; a corrupt cache is re-rendered)."""
    key = json.dumps({"v": RENDER_VERSION, "n": images_per_class, "seed": render_seed}, sort_keys=True)
    path = Path(cache_dir) / f"digit_pairs_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as blob:
                return blob["images"], blob["labels"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning(f"re-rendering the digit-pairs cache {path}: {exc}")
    images, labels = render_dataset(images_per_class, render_seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, images=images, labels=labels)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only data folder only costs the rendering time next run
        log.warning(f"could not cache the digit pairs in {path.parent}: {exc}")
    return images, labels


class DigitPairsDataModule(RetrievalDataModule):
    name = "digit_pairs"
    zero_shot_split = "class_halves"
    url = "(rendered from scikit-learn's bundled digits)"

    def __init__(self, images_per_class: int = 40, render_seed: int = 0, **kwargs) -> None:
        # the embedded benchmark's settings, the same as conf/dataset/digit_pairs.yaml (a test compares them)
        kwargs.setdefault("image_size", CANVAS)
        kwargs.setdefault("mean", PAIR_MEAN)
        kwargs.setdefault("std", PAIR_STD)
        kwargs.setdefault("hflip", False)  # a mirrored "12" is not a 12
        kwargs.setdefault("val_fraction", 0.2)
        kwargs.setdefault("eval_batch_size", 256)
        super().__init__(**kwargs)
        self.images_per_class, self.render_seed = images_per_class, render_seed
        self._pixels: np.ndarray | None = None

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = cached_dataset(self.root, self.images_per_class, self.render_seed)
        self._pixels = images
        return images, labels

    def read_records(self) -> list[ImageRecord]:
        _, labels = self._load()
        return [ImageRecord(path=f"digit_pairs://{i}", label=int(label),
                            split="test" if i % self.images_per_class % 5 == 4 else "train")
                for i, label in enumerate(labels.tolist())]

    def load_image(self, record_id: int) -> Image.Image:
        if self._pixels is None:
            self._load()
        return Image.fromarray(self._pixels[record_id])
