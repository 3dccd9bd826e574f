"""DeepFashion In-shop Clothes Retrieval: 52,712 shop photos of 7,982 items, official query/gallery split.

``Eval/list_eval_partition.txt`` is ``<count>``, a header ``image_name item_id evaluation_status``, then
whitespace-padded rows; the status (train / query / gallery) becomes `ImageRecord.split` and the item id
(``id_00000002``) the integer label 2. Image names (``img/WOMEN/Dresses/id_00000002/02_1_front.jpg``) are
relative to ``Img/``, where ``img.zip`` unpacks; an ``img/`` unpacked at the top is accepted too. Boxes come
from ``Anno/list_bbox_inshop.txt`` when present (only needed for crop=true); a box reaching outside its image
is clamped at load time by `open_rgb`.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.base import RetrievalDataModule
from datamodules.layout import ExistingFiles, find_dataset_dir, parse_int, read_table
from datamodules.records import AnnotationError, DatasetLayoutError, ImageRecord

PARTITION = "Eval/list_eval_partition.txt"
BOXES = "Anno/list_bbox_inshop.txt"
PARTITION_HEADER = ["image_name", "item_id", "evaluation_status"]
BOXES_HEADER = ["image_name", "clothes_type", "pose_type", "x_1", "y_1", "x_2", "y_2"]
STATUSES = ("train", "query", "gallery")
TOP_FOLDERS = ["In-shop Clothes Retrieval Benchmark", "InShop", "In-shop", "inshop"]
EXPECTED = [
    "Eval/list_eval_partition.txt",
    "Anno/list_bbox_inshop.txt (needed for crop=true)",
    "Img/img/<MEN|WOMEN>/<category>/id_XXXXXXXX/<file>.jpg (unzip Img/img.zip inside Img/)",
]


def _read_counted_table(path: Path, header: list[str]) -> list[tuple[int, list[str]]]:
    """DeepFashion's list format: line 1 = number of rows, line 2 = column names, then the rows."""
    with open(path, encoding="utf-8") as handle:
        count_line, header_line = handle.readline(), handle.readline()
    count = parse_int(count_line.strip(), path, 1, "the first line (row count)")
    if header_line.split() != header:
        raise AnnotationError(
            path, 2, f"expected the header {' '.join(header)!r}, got {header_line.strip()!r}"
        )
    rows = list(read_table(path, len(header), skip_lines=2))
    if len(rows) != count:
        raise AnnotationError(path, 1, f"announces {count} rows but has {len(rows)}; is the file truncated?")
    return rows


def item_label(item_id: str, path: Path, line_number: int) -> int:
    """``id_00000002`` -> 2."""
    if not item_id.startswith("id_") or not item_id[3:].isdigit():
        raise AnnotationError(path, line_number, f"item_id must look like id_00000002, got {item_id!r}")
    return int(item_id[3:])


class InShopDataModule(RetrievalDataModule):
    name = "isc"
    zero_shot_split = "official"
    url = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"

    def read_records(self) -> list[ImageRecord]:
        base = find_dataset_dir(
            self.root,
            TOP_FOLDERS,
            [PARTITION, "Eval", "Anno", "Img"],
            dataset=self.name,
            url=self.url,
            expected=EXPECTED,
        )
        if not (base / PARTITION).exists():
            raise DatasetLayoutError(self.name, base, f"missing {PARTITION}.", EXPECTED, self.url)
        image_base = next((d for d in (base / "Img", base) if (d / "img").is_dir()), None)
        if image_base is None:
            raise DatasetLayoutError(
                self.name, base, "missing the image folder Img/img/ (unzip Img/img.zip).", EXPECTED, self.url
            )
        if self.crop and not (base / BOXES).exists():
            raise DatasetLayoutError(self.name, base, f"crop=true needs {BOXES}.", EXPECTED, self.url)
        boxes = self._read_boxes(base / BOXES) if (base / BOXES).exists() else {}

        partition = base / PARTITION
        existing = ExistingFiles()
        records = []
        for line_number, (name, item_id, status) in _read_counted_table(partition, PARTITION_HEADER):
            if status not in STATUSES:
                raise AnnotationError(
                    partition, line_number, f"evaluation_status must be one of {STATUSES}, got {status!r}"
                )
            path = image_base / name
            if str(path) not in existing:
                raise AnnotationError(partition, line_number, f"image {path} does not exist")
            box, box_source = boxes.get(name, (None, None))
            records.append(
                ImageRecord(str(path), item_label(item_id, partition, line_number), status, box, box_source)
            )
        if not records:
            raise DatasetLayoutError(self.name, base, f"{PARTITION} lists no images.", EXPECTED, self.url)
        return records

    @staticmethod
    def _read_boxes(path: Path) -> dict[str, tuple[tuple[float, float, float, float], str]]:
        """image name -> (box, "<file>:<line>")."""
        boxes = {}
        for line_number, fields in _read_counted_table(path, BOXES_HEADER):
            x1, y1, x2, y2 = (parse_int(v, path, line_number, "box coordinate") for v in fields[3:])
            if (
                x2 > x1 and y2 > y1
            ):  # a degenerate box leaves the image uncropped rather than failing the dataset
                boxes[fields[0]] = ((float(x1), float(y1), float(x2), float(y2)), f"{path}:{line_number}")
        return boxes
