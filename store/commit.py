"""Create-if-absent writes: the only way anything becomes visible to readers.

A file is first written in full to a hidden temp name in the same directory and fsynced, then hard-linked
to its final name. ``link`` fails atomically if the name exists, so exactly one writer wins a race and a
reader never sees a partial file. Temp names start with "." so pyarrow datasets and listings ignore them.
(Object stores get the same semantics from conditional PUTs: store/remote.py, docs/SHARING.md.)
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .faults import crash_point


def create_if_absent(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless it exists. True if this call created it, False if it existed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
    try:
        write_synced(tmp, data)
        crash_point("commit-temp-written")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        crash_point("commit-linked")
        _fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable (a crash after commit must not lose the commit)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it: durable before it is linked or renamed into place."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
