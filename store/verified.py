"""Every read of a committed segment is checked against its commit record before a byte of it is used.

A manifest part records {file: (size, crc32c)} for every file of its segment (integrity.py). The zarr store
here serves exactly those files and nothing else: the first time a file is needed it is read whole, its size
and crc32c compared with the record, and only then are byte ranges of it handed to zarr. A flipped bit, a
truncated chunk, a deleted ``zarr.json`` or a stray file therefore becomes a StoreError naming the store,
the segment and the file -- never a value.

Why whole files: zarr reads a sharded ``hidden`` array as many byte ranges of one shard file (its index,
then each inner chunk), and the crc32c covers the file. Checked files are kept in a small LRU, so a shard
file is read from disk once however many ranges zarr asks for; crc32c runs at ~20 GB/s, so the check costs
little next to zstd decoding (docs/BENCHMARKS.md, "Read-time verification").
"""

from __future__ import annotations

import asyncio
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import numpy as np
from zarr.abc.buffer import Buffer, BufferPrototype  # public since zarr 3.1 (zarr.core is private)
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from .errors import StoreError
from .integrity import crc32c_hex

# Checked files kept in memory per store: a few shard files of SmolLM2's hidden array (~25 MB each). The file
# being read is always kept, so a larger model's shard (~130 MB for a 3B model) still costs one read.
CHECKED_CACHE_BYTES = 96 << 20

FileRecord = dict[str, tuple[int, str]]  # path relative to the segment -> (size, crc32c hex)


class CheckedFiles:
    """Whole files that passed their check, most recently used last, bounded in bytes (thread-safe)."""

    def __init__(self, limit: int = CHECKED_CACHE_BYTES):
        self.limit = limit
        self._files: OrderedDict[Path, bytes | np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: Path) -> bytes | np.ndarray | None:
        with self._lock:
            data = self._files.get(path)
            if data is not None:
                self._files.move_to_end(path)
            return data

    def put(self, path: Path, data: bytes | np.ndarray) -> None:
        with self._lock:
            if path in self._files:
                return
            self._files[path] = data
            self._bytes += len(data)
            while self._bytes > self.limit and len(self._files) > 1:
                _, old = self._files.popitem(last=False)
                self._bytes -= len(old)


class VerifiedSegmentStore(LocalStore):
    """A read-only zarr store over one committed segment folder that serves only recorded, checked files.

    ``where`` names the segment in errors (the store and segment); subclasses change where bytes come from
    (``_load``), never how they are checked.
    """

    def __init__(self, root: Path, files: FileRecord, checked: CheckedFiles, where: str):
        super().__init__(root, read_only=True)
        self.files, self.checked, self.where = files, checked, where
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def with_read_only(self, read_only: bool = False) -> VerifiedSegmentStore:
        if not read_only:
            raise StoreError(f"{self.where}: committed segments are read-only")
        return self

    async def _open(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"{self.where} is missing (a manifest part commits it): the store is damaged; run "
                             "`probecache store verify`, then rerun the extract command")
        await super()._open()

    def _load(self, key: str) -> bytes | np.ndarray:
        """The file's bytes as stored (checked by the caller)."""
        try:
            return read_off_heap(self.root / key)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StoreError(f"{self.where}/{key} is missing (its commit recorded it): the store is damaged; "
                             "run `probecache store verify`, then rerun the extract command") from None

    def checked_bytes(self, key: str) -> bytes | np.ndarray:
        """The whole recorded file ``key``, after its size and crc32c matched the commit record."""
        path = self.root / key
        data = self.checked.get(path)
        if data is not None:
            return data
        with self._key_lock(key):  # zarr asks for many ranges of one file at once: read and check it once
            data = self.checked.get(path)
            if data is not None:
                return data
            size, crc = self.files[key]
            data = self._load(key)
            if len(data) != size:
                raise StoreError(f"{self.where}/{key} has {len(data)} bytes, its commit recorded {size} (truncated "
                                 "or rewritten): run `probecache store verify`, then rerun the extract command")
            if crc32c_hex(data) != crc:
                # same size, other bytes: a rerun of extract checks sizes only, so the shard's commit must go
                raise StoreError(f"{self.where}/{key} is corrupted (crc32c differs from its commit record): run "
                                 "`probecache store verify`, delete the manifest part it names, then rerun the "
                                 "extract command")
            self.checked.put(path, data)
            return data

    def _key_lock(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    async def get(self, key: str, prototype: BufferPrototype | None = None, byte_range=None) -> Buffer | None:
        if key not in self.files:
            return None  # not part of the committed segment: zarr treats it as absent
        prototype = prototype or default_buffer_prototype()
        data = self.checked.get(self.root / key)
        if data is None:
            data = await asyncio.to_thread(self.checked_bytes, key)
        return prototype.buffer.from_bytes(_byte_range(memoryview(data), byte_range))

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, object]]
                                 ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        return key in self.files

    async def list(self) -> AsyncIterator[str]:
        for key in self.files:
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in self.files:
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        seen = set()
        for key in self.files:
            if key.startswith(prefix):
                head = key[len(prefix):].split("/", 1)[0]
                if head not in seen:
                    seen.add(head)
                    yield head


def read_off_heap(path: Path) -> bytes | np.ndarray:
    """A whole file's bytes, read-only, in an anonymous memory mapping of their own rather than on the heap.

    Shard files are tens of MB (SmolLM2: ~25 MB) and a token stream reads a few per segment. Under glibc's
    dynamic mmap threshold (raised to 32 MB by the first such block freed) they would come from the heap, where,
    interleaved with zarr's decoded chunks and the batches, they fragment it: peak RSS grew with the segments
    read (+44% at 16x the store, docs/BENCHMARKS.md "Scale"). A mapping of their own is returned to the kernel
    when the last view of it goes, and nothing else in the process pays for it (pinning the threshold instead
    sent every block over 128 KiB, the probe's tensors included, to mmap: up to 2x an epoch's time).
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        got = f.readinto(mapping)
    data = np.frombuffer(mapping, dtype=np.uint8, count=got)  # short only if the file shrank: its size check fails
    data.flags.writeable = False  # read-only, as bytes were (and crc32c takes read-only buffers only)
    return data


def _byte_range(data: memoryview, byte_range) -> memoryview:
    """The part of a whole file that a zarr byte request asks for (zero-copy)."""
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[max(0, len(data) - byte_range.suffix) :]
    raise TypeError(f"unexpected byte range {byte_range!r}")
