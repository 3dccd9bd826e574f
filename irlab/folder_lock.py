"""One job at a time in a shared folder: a lock file that a dead job cannot leave behind for ever.

IRGen's stage folders are shared by every run of a dataset/protocol/seed, and a SLURM multirun starts jobs in
parallel: without a lock two jobs train the same tokenizer into the same files, one resumes from the other's
half-written state and one's checkpoint pruning deletes the other's best file. With it, the second job waits, then
finds the finished stage and reuses it.

The lock is a file created exclusively (``O_CREAT | O_EXCL``, atomic on local and NFS v3+ file systems) holding
the owner's host and pid. The owner refreshes its modification time every `HEARTBEAT_S` seconds from a thread.
A waiting job breaks the lock when its owner is gone: the same host and a pid that no longer exists, or (another
host: a cluster's shared file system) no refresh for `STALE_AFTER_S` seconds. Only global rank 0 of a DDP job
takes it (the other ranks follow rank 0's decisions).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
POLL_S = 2.0


def _owner_alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot tell from here: the heartbeat decides
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def lock_is_stale(lock: Path, stale_after: float = STALE_AFTER_S) -> bool:
    """Its owner died on this host, or it has not been refreshed for `stale_after` seconds."""
    try:
        info = json.loads(lock.read_text() or "{}")
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    except (json.JSONDecodeError, ValueError):  # being written right now, or garbage: go by age only
        info, age = {}, time.time() - lock.stat().st_mtime
    return age > stale_after or (bool(info) and not _owner_alive(info))


def _try_create(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
    return True


@contextmanager
def folder_lock(folder: Path, what: str, enabled: bool = True, stale_after: float = STALE_AFTER_S,
                poll: float = POLL_S) -> Iterator[None]:
    """Hold ``<folder>.lock`` (next to `folder`) for the block; wait while another live job holds it. `what`
    names the work in the waiting message. ``enabled=False`` (DDP ranks other than 0): no lock."""
    if not enabled:
        yield
        return
    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    waited = 0.0
    while not _try_create(lock):
        if lock_is_stale(lock, stale_after):
            log.warning(f"{lock}: breaking a stale lock ({lock.read_text(errors='replace')[:200]})")
            lock.unlink(missing_ok=True)
            continue
        if waited == 0.0:
            log.info(f"{what}: another job holds {lock} ({lock.read_text(errors='replace')[:200]}); waiting for it")
        time.sleep(poll)
        waited += poll
    if waited:
        log.info(f"{what}: lock {lock} taken after waiting {waited:.0f} s")
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(min(HEARTBEAT_S, stale_after / 4)):
            try:
                os.utime(lock)
            except FileNotFoundError:
                return

    thread = threading.Thread(target=heartbeat, name="folder-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        lock.unlink(missing_ok=True)
