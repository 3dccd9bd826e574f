"""Helpers shared by the benchmark readers: locate the unpacked archive, parse annotations, check images.

Users unpack archives in different ways (``data/cub/CUB_200_2011/images.txt`` or ``data/cub/images.txt``), so
every reader first calls `find_dataset_dir`. Annotation files are parsed with `read_table`, which turns any
malformed line into an `AnnotationError` carrying the file and the 1-based line number, because "ValueError:
invalid literal for int()" 100k lines into a file tells the user nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from datamodules.records import AnnotationError, DatasetLayoutError


def find_dataset_dir(
    root: Path | str,
    top_folders: Sequence[str],
    markers: Sequence[str],
    *,
    dataset: str,
    url: str,
    expected: Sequence[str] | None = None,
) -> Path:
    """The folder holding the dataset's files: `root`, `root/<one of top_folders>`, or root's only subfolder.

    A candidate qualifies when it contains at least one of `markers` (paths relative to it); the reader then
    checks the rest with `require`, so that a half-extracted download is reported file by file rather than as
    "dataset not found". The last fallback (a single subfolder of any name that holds a marker) covers mirrors
    that rename the archive's top folder.
    """
    root = Path(root)
    expected = list(expected or markers)
    if not root.is_dir():
        raise DatasetLayoutError(dataset, root, "the dataset folder does not exist.", expected, url)
    candidates = [root] + [root / top for top in top_folders]
    for folder in candidates:
        if any((folder / marker).exists() for marker in markers):
            return folder
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and p not in candidates)
    matching = [p for p in subfolders if any((p / marker).exists() for marker in markers)]
    if len(matching) == 1:
        return matching[0]
    problem = "found none of the dataset's annotation files."
    if len(matching) > 1:
        problem = (
            f"several subfolders look like the dataset ({', '.join(p.name for p in matching)}); set root."
        )
    raise DatasetLayoutError(dataset, root, problem, expected, url)


def require(base: Path, names: Sequence[str], *, dataset: str, url: str, expected: Sequence[str]) -> None:
    """Raise `DatasetLayoutError` naming every file of `names` (relative to `base`) that is missing."""
    missing = [name for name in names if not (base / name).exists()]
    if missing:
        raise DatasetLayoutError(dataset, base, f"missing {', '.join(missing)}.", list(expected), url)


def first_existing(base: Path, options: Sequence[str]) -> Path | None:
    """The first of `options` (relative to `base`) that exists, or None."""
    for option in options:
        if (base / option).exists():
            return base / option
    return None


def read_table(path: Path, n_columns: int, skip_lines: int = 0) -> Iterator[tuple[int, list[str]]]:
    """Yield (line_number, fields) for each non-blank line after `skip_lines`, split on any whitespace.

    Every data line must have exactly `n_columns` fields; otherwise `AnnotationError(path, line, ...)`.
    """
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line_number <= skip_lines or not line.strip():
                continue
            fields = line.split()
            if len(fields) != n_columns:
                raise AnnotationError(
                    path, line_number, f"expected {n_columns} columns, found {len(fields)}: {line.strip()!r}"
                )
            yield line_number, fields


def parse_int(value: str, path: Path, line_number: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AnnotationError(path, line_number, f"{what} must be an integer, got {value!r}") from None


def parse_float(value: str, path: Path, line_number: int, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise AnnotationError(path, line_number, f"{what} must be a number, got {value!r}") from None


class ExistingFiles:
    """Fast existence test for many images: lists each folder once instead of one stat per file.

    SOP has 120k images in a dozen folders; listing them is far cheaper than 120k stats on network storage.
    A name absent from the listing is re-checked with `os.path.exists` (case-insensitive file systems).
    """

    def __init__(self) -> None:
        self._listings: dict[str, frozenset[str]] = {}

    def __contains__(self, path: str | Path) -> bool:
        folder, name = os.path.split(os.fspath(path))
        listing = self._listings.get(folder)
        if listing is None:
            try:
                listing = frozenset(os.listdir(folder or "."))
            except OSError:
                listing = frozenset()
            self._listings[folder] = listing
        return name in listing or os.path.exists(path)
