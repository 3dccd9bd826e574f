"""Dataset-independent description of one image and the errors a dataset reader raises.

Every dataset reader turns its official annotation files into a flat list of `ImageRecord`s; everything
downstream (protocol splits, loaders, evaluation) works on that list only, so adding a dataset means writing
one reader and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datamodules.errors import UserInputError

# Official split tags a reader may assign. "train"/"test" for CUB, CARS, SOP and the embedded set;
# "train"/"query"/"gallery" for In-shop.
SPLITS = ("train", "test", "query", "gallery")


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, its original class id, its official split and optional box (x1, y1, x2, y2)."""

    path: str
    label: int
    split: str
    bbox: tuple[float, float, float, float] | None = None
    # where the box was read ("<file>:<line>" or "<file> entry <i>"), so a bad box is reported at its source
    bbox_source: str | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r} for {self.path}")


class DatasetLayoutError(UserInputError, FileNotFoundError):
    """A dataset folder is missing or does not look like the official download.

    The message always names the folder that was searched, the files that were expected there and the
    page the archive comes from, because the usual cause is an archive unpacked one level too deep or shallow.
    """

    def __init__(self, dataset: str, root: Path | str, problem: str, expected: list[str], url: str) -> None:
        listing = "\n".join(f"  - {name}" for name in expected)
        super().__init__(
            f"{dataset}: {problem}\n"
            f"Searched: {root}\n"
            f"Expected (either directly there or inside the archive's top folder):\n{listing}\n"
            f"Download it from {url} and unpack it into {root} (or set paths.data_dir / dataset.root)."
        )


class AnnotationError(UserInputError, ValueError):
    """An annotation file has a line that cannot be parsed or points at something that does not exist."""

    def __init__(self, file: Path | str, line_number: int | None, problem: str) -> None:
        where = f"{file}:{line_number}" if line_number is not None else str(file)
        super().__init__(f"{where}: {problem}")
