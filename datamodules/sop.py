"""Stanford Online Products: 120,053 eBay photos of 22,634 products (``Stanford_Online_Products.zip``).

``Ebay_train.txt`` (59,551 images, classes 1-11,318) and ``Ebay_test.txt`` (60,502 images, classes
11,319-22,634) each start with the header ``image_id class_id super_class_id path``; paths such as
``bicycle_final/111085122871_0.JPG`` are relative to the archive folder. The official files already separate
the classes, so zero-shot uses them as they are and closed-set is impossible (the protocol says so).
"""

from __future__ import annotations

from pathlib import Path

from datamodules.base import RetrievalDataModule
from datamodules.layout import ExistingFiles, find_dataset_dir, parse_int, read_table, require
from datamodules.records import AnnotationError, DatasetLayoutError, ImageRecord

FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
HEADER = ["image_id", "class_id", "super_class_id", "path"]
EXPECTED = [
    "Stanford_Online_Products/Ebay_train.txt",
    "Stanford_Online_Products/Ebay_test.txt",
    "Stanford_Online_Products/<category>_final/<file>.JPG",
]


def read_ebay_file(path: Path, split: str, existing: ExistingFiles) -> list[ImageRecord]:
    """Records of one Ebay_*.txt file; the header is checked so a shifted or foreign file fails early."""
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().split()
    if header != HEADER:
        raise AnnotationError(path, 1, f"expected the header {' '.join(HEADER)!r}, got {' '.join(header)!r}")
    records = []
    for line_number, (_, class_id, _, relpath) in read_table(path, 4, skip_lines=1):
        image = path.parent / relpath
        if str(image) not in existing:
            raise AnnotationError(path, line_number, f"image {image} does not exist")
        records.append(ImageRecord(str(image), parse_int(class_id, path, line_number, "class_id"), split))
    return records


class SOPDataModule(RetrievalDataModule):
    name = "sop"
    zero_shot_split = "official"
    url = "https://cvgl.stanford.edu/projects/lifted_struct/"

    def read_records(self) -> list[ImageRecord]:
        base = find_dataset_dir(
            self.root,
            ["Stanford_Online_Products"],
            list(FILES.values()),
            dataset=self.name,
            url=self.url,
            expected=EXPECTED,
        )
        require(base, list(FILES.values()), dataset=self.name, url=self.url, expected=EXPECTED)
        existing = ExistingFiles()
        records = [r for split, name in FILES.items() for r in read_ebay_file(base / name, split, existing)]
        if not records:
            raise DatasetLayoutError(
                self.name, base, "the Ebay_*.txt files list no images.", EXPECTED, self.url
            )
        train = {r.label for r in records if r.split == "train"}
        overlap = train & {r.label for r in records if r.split == "test"}
        if overlap:
            raise AnnotationError(
                base / FILES["test"],
                None,
                f"class ids {sorted(overlap)[:5]} also appear in {FILES['train']}; "
                "the official splits have disjoint classes",
            )
        return records
