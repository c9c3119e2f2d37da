"""Create-if-absent writes: the only way anything becomes visible to readers.

A file is first written in full to a hidden temp name in the same directory and fsynced, then hard-linked
to its final name. ``link`` fails atomically if the name exists, so exactly one writer wins a race and a
reader never sees a partial file. Temp names are ``.probecache-tmp-<name>-<machine>-<pid>-<32 hex>``: they
start with "." so pyarrow datasets and listings ignore them; `gc` removes only names of exactly that form (never
a user's file that merely starts with ".tmp-"), and the writer they name (store/lease.py machine_tag, the pid)
lets a gc on the same machine keep the temp files of a writer that is still running, whatever --older-than.
(Object stores get the same semantics from conditional PUTs: store/remote.py, docs/SHARING.md.)
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from .faults import crash_point
from .lease import machine_tag

TEMP_PREFIX = ".probecache-tmp-"
# fullmatch: what temp_path() produces; groups: target name, machine tag, pid
TEMP_NAME = re.compile(r"\.probecache-tmp-(.+)-([0-9a-f]{8})-(\d{1,10})-[0-9a-f]{32}")


def temp_path(target: Path) -> Path:
    """A reserved temp name next to ``target`` (same folder, so a link or rename into place is atomic)."""
    return target.parent / f"{TEMP_PREFIX}{target.name}-{machine_tag()}-{os.getpid()}-{uuid.uuid4().hex}"


def create_if_absent(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless it exists. True if this call created it, False if it existed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    tmp = temp_path(path)
    try:
        write_synced(tmp, data)
        crash_point("commit-temp-written")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        crash_point("commit-linked")
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
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
