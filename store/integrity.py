"""Checksums that let `verify` prove a committed segment is exactly what its commit recorded.

crc32c (hardware-accelerated, ~20 GB/s here) over every file of a segment; the commit stores
{relative path: [size, crc32c hex]} in the manifest part, so nothing outside the part is trusted.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import google_crc32c
import pyarrow as pa


def crc32c_hex(data: bytes | memoryview) -> str:
    return f"{google_crc32c.value(data):08x}"


def file_crc32c(path: Path) -> str:
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            checksum.update(block)
    return checksum.hexdigest().decode()


def segment_files(root: Path, known: dict[str, tuple[int, str]] | None = None) -> dict[str, tuple[int, str]]:
    """{path relative to root: (size, crc32c)} for every file under root; ``known`` entries are reused
    (the writer already checksummed the bytes it wrote, so they need not be read back)."""
    known = known or {}
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            rel = path.relative_to(root).as_posix()
            out[rel] = known[rel] if rel in known else (path.stat().st_size, file_crc32c(path))
    return dict(sorted(out.items()))


def plan_digest(table: pa.Table) -> str:
    """Content hash of a plan table (store.json's ``plan.sha256``): values, not Parquet bytes, which depend
    on the writer's version."""
    h = hashlib.sha256()
    for column in table.column_names:
        h.update(column.encode())
        h.update(repr(table[column].to_pylist()).encode())
    return h.hexdigest()
