"""Read the records of an offline W&B run (``run-<id>.wandb``): config, history, summary, artifacts.

wandb >= 0.2x (wandb-core) writes an offline run's config and summary only into this record log, not as
``files/config.yaml`` / ``wandb-summary.json``. The log is LevelDB's format: a 7-byte header, then 32 KiB
blocks of chunks ``crc32 (4) | length (2) | type (1) | data`` (type 1 full, 2 first, 3 middle, 4 last), each
record a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

_BLOCK, _HEADER = 32768, 7


def records(path: str | Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    raw = Path(path).read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + _HEADER])
        data, pos = raw[pos + _HEADER:pos + _HEADER + length], pos + _HEADER + length
        if kind in (1, 2):
            buf = data
        elif kind in (3, 4):
            buf += data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def offline_run_log(run_folder: str | Path) -> Path:
    logs = sorted(Path(run_folder).glob("wandb/offline-run-*/run-*.wandb"))
    if len(logs) != 1:
        raise AssertionError(f"expected one offline W&B run under {run_folder}, found {logs}")
    return logs[0]


def run_record(run_folder: str | Path):
    """The ``run`` record (id, display_name, run_group, ...) of the single offline run in `run_folder`."""
    return next(r.run for r in records(finished_run_log(run_folder)) if r.WhichOneof("record_type") == "run")


def finished_run_log(run_folder: str | Path, timeout: float = 30.0) -> Path:
    """The run log once wandb-core has written it completely (`wandb.finish()` can return slightly earlier)."""
    path, deadline, last_size = offline_run_log(run_folder), time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        size = path.stat().st_size
        if size == last_size and any(r.WhichOneof("record_type") == "exit" for r in records(path)):
            return path
        last_size = size
        time.sleep(0.5)
    raise AssertionError(f"{path} did not receive its exit record within {timeout} s")


def main(argv: list[str]) -> None:
    """``python tests/scripts/wandb_records.py <run folder>``: print an offline run's name, group and summary."""
    import json

    log = offline_run_log(argv[0])
    summary: dict[str, str] = {}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            print(f"run {record.run.run_id}: name={record.run.display_name!r} group={record.run.run_group!r}")
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): i.value_json for i in record.summary.update})
    for key in sorted(k for k in summary if not k.startswith("_") and len(summary[k]) < 40):
        print(f"{key} = {json.loads(summary[key])}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
