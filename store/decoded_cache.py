"""The decoded cache: an uncompressed local copy of the examples a token stream reads, bounded, verified, LRU.

Reading a store costs zstd decoding on every epoch of every run (~1 GB/s per core here); reading an uncompressed
file costs a copy. Training reads the same examples of a segment at the same layers once per epoch, and a sweep
of separate runs reads them again per run, so examples decoded once and kept uncompressed on local disk make
every later read a copy plus a checksum (docs/BENCHMARKS.md, "Scale": one probe from the store vs torch.save files).

- **What is kept:** one file per segment that a :class:`~probecache.train.loaders.TokenStream` reads: its
  examples of the split, each as (n, L', d) stored values at the layers in use, as ``read_tokens(...,
  decode=False)`` returns them (an fp8/intK tier already dequantised). Only the layers a probe reads are kept.
  Token-major, so that each example is one contiguous run of the file. An entry is read with one ``readinto``
  into one array and the stream copies each example from it into its token pages (train/arena.py).
- **Where:** ``<dir>/<store_id>/<key>.blk``; ``dir`` defaults to $PROBECACHE_CACHE/decoded. ``key`` hashes the
  segment's commit record (every file's size and crc32c), the tier, the layers and the examples' token ranges:
  a segment that is repaired or re-extracted with other bytes gets a new key, so an entry never outlives the
  bytes it came from.
- **Verified:** a file is a header (magic, JSON: dtype, L', d, each example's token count and crc32c) and the
  examples' values. Every read checks the length and each example's crc32c (~20 GB/s) before a value is used;
  a file that fails is deleted and the segment is read from the store again, so a torn or flipped cache file
  costs a decode, never a wrong value.
- **Bounded:** entries under ``dir`` (all stores together) stay within ``limit`` bytes. Before writing, the least
  recently used entries (mtime, touched on each hit) are deleted, except the ones this process has used: a working
  set larger than the limit then keeps its first ``limit`` bytes cached and reads the rest from the store, instead
  of evicting its own entries every epoch. Several processes may share a folder; a process counts the others'
  entries from a scan at most 10 s old (and rescans whenever its count nears the limit), so the folder may
  overshoot by what the others wrote since.
- **Safe eviction:** entries appear by ``os.replace`` of a finished temporary file (a reader never sees a partial
  one) and go by ``unlink``; a reader that finds its entry gone reads the store instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .integrity import crc32c_hex
from .mirror import parse_size
from .remote import cache_dir

MAGIC = b"probecache-decoded-2\n"
SUFFIX = ".blk"
_TMP = ".tmp-"
_STALE_TMP_S = 3600  # a writer's temporary file older than this is from a crashed process
_RESCAN_S = 10.0  # how old this process's count of the folder (others' writes included) may get


def default_dir() -> Path:
    return cache_dir() / "decoded"


@dataclass
class CacheStats:
    hits: int = 0  # segment reads served from the cache
    written: int = 0  # segment reads decoded from the store and kept
    skipped: int = 0  # segment reads decoded from the store and not kept (the limit was full of entries in use)
    rejected: int = 0  # cache files that failed their check (deleted, read from the store instead)
    bytes_read: int = 0  # values served from the cache


@dataclass
class DecodedCache:
    """A folder of decoded entries (a segment's examples at some layers) capped at ``limit`` bytes (see the module
    docstring). Thread-safe."""

    root: Path
    limit: int
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.limit < 0:
            raise ValueError(f"decoded cache limit must be >= 0 bytes, got {self.limit}")
        self._lock = threading.Lock()
        self._mine: set[Path] = set()  # entries this process used: never evicted by it
        # bytes under the folder as of the last scan, plus what this process wrote since: a write scans the folder
        # only when this says the limit is near or the scan is old, not once per entry (quadratic in entries)
        self._used: int | None = None
        self._scanned_at = 0.0

    @classmethod
    def from_option(cls, size: str | int | None, folder: str | Path | None = None) -> DecodedCache | None:
        """``--decoded-cache SIZE`` (500M, 20G; 0 or None: off) under ``folder`` (default :func:`default_dir`)."""
        if size is None or str(size).strip().lower() in ("", "0", "off", "none"):
            return None
        return cls(Path(folder).expanduser() if folder else default_dir(), parse_size(size))

    @property
    def spec(self) -> tuple[str, int]:
        """(folder, limit): what another process (a dask worker) needs to open the same cache."""
        return str(self.root), self.limit

    # ---- the read -----------------------------------------------------------------------------------------

    def read_examples(self, store, segment: str, ranges: list[list[tuple[int, int]]], layers: list[int],
                      buffer: ReadBuffer | None = None) -> list[np.ndarray]:
        """The examples of one segment of a reader.Store (not imported: reader imports this module) whose tokens
        are ``ranges`` (per example: [start, stop) ranges on the segment's token axis, concatenated), at
        ``layers``: per example (L', n, d) stored values, a view of the entry's (tokens, L', d) values. From the
        cache when a checked entry is there, else decoded from the store (and kept, if the limit allows). With a
        ``buffer`` an entry is read into it (the views are valid until its next use), else into a new array."""
        files = store.segment_files(segment)
        if files is None or self.limit == 0:  # no commit record to key the entry to: never cached
            return [a.transpose(1, 0, 2) for a in _decode(store, segment, ranges, layers)]
        path = self.root / store.store_id / (self._key(store, segment, files, ranges, layers) + SUFFIX)
        examples = self._load(path, buffer)
        if examples is None:
            examples = _decode(store, segment, ranges, layers)
            self._keep(path, examples)
        return [a.transpose(1, 0, 2) for a in examples]

    def _key(self, store, segment: str, files: dict, ranges: list[list[tuple[int, int]]], layers: list[int]) -> str:
        what = {"segment": segment, "files": sorted((k, *v) for k, v in files.items()), "tier": store.tier.name,
                "dtype": store.logical_dtype, "layers": [int(x) for x in layers],
                "ranges": [[[int(a), int(b)] for a, b in r] for r in ranges]}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:40]

    def _load(self, path: Path, buffer: ReadBuffer | None) -> list[np.ndarray] | None:
        try:
            examples = read_entry(path, buffer)
        except FileNotFoundError:
            return None  # never written, or evicted by another process: read the store
        with self._lock:
            if examples is None:
                self.stats.rejected += 1
                _unlink(path)
                return None
            self.stats.hits += 1
            self.stats.bytes_read += sum(a.nbytes for a in examples)
            self._mine.add(path)
        try:
            os.utime(path)  # last use, for LRU eviction
        except FileNotFoundError:
            pass
        return examples

    # ---- the write ----------------------------------------------------------------------------------------

    def _keep(self, path: Path, examples: list[np.ndarray]) -> None:
        """Write one entry: the header (dtype, L', d, and per example its token count and crc32c), then each
        example's (n, L', d) values (``examples`` are C-contiguous)."""
        first = examples[0]
        header = json.dumps({"dtype": first.dtype.str, "layers": first.shape[1], "width": first.shape[2],
                             "examples": [[a.shape[0], crc32c_hex(_read_only(a))] for a in examples]}).encode()
        size = len(MAGIC) + 8 + len(header) + sum(a.nbytes for a in examples)
        with self._lock:
            if not self._make_room(size, path):
                self.stats.skipped += 1
                return
            self._mine.add(path)
            self.stats.written += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP}{path.stem}.{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(header).to_bytes(8, "little") + header)
            for a in examples:
                f.write(a)
        os.replace(tmp, path)  # whole or absent: readers never see a partial entry

    def _make_room(self, size: int, path: Path) -> bool:
        """Delete least recently used entries not in use here until ``size`` more bytes fit (caller holds the
        lock); False when they cannot be made to fit. Accounts ``size`` as written when it returns True."""
        if size > self.limit:
            return False
        now = time.monotonic()
        if self._used is not None and self._used + size <= self.limit and now - self._scanned_at < _RESCAN_S:
            self._used += size
            return True
        entries = self.entries()  # the authoritative count: other processes may share the folder
        used = sum(s for _, s, _ in entries)
        for old, old_size, _ in sorted(entries, key=lambda e: e[2]):
            if used + size <= self.limit:
                break
            if old not in self._mine and old != path:
                _unlink(old)
                used -= old_size
        self._used, self._scanned_at = used, now
        if used + size > self.limit:
            return False
        self._used += size
        return True

    # ---- inspection (probecache store decoded-cache) ------------------------------------------------------

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last use) of every entry under the folder, all stores; stale temporary files go."""
        out = []
        if not self.root.is_dir():
            return out
        now = time.time()
        for store_dir in self.root.iterdir():
            if not store_dir.is_dir():
                continue
            for entry in os.scandir(store_dir):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.startswith(_TMP):
                    if now - st.st_mtime > _STALE_TMP_S:
                        _unlink(Path(entry.path))
                elif entry.name.endswith(SUFFIX):
                    out.append((Path(entry.path), st.st_size, st.st_mtime))
        return out

    def usage(self) -> dict[str, tuple[int, int]]:
        """{store_id: (entries, bytes)}."""
        out: dict[str, tuple[int, int]] = {}
        for path, size, _ in self.entries():
            n, b = out.get(path.parent.name, (0, 0))
            out[path.parent.name] = (n + 1, b + size)
        return out

    def clear(self, store_id: str | None = None) -> int:
        """Delete every entry (of one store, or all); returns the bytes freed."""
        freed = 0
        for path, size, _ in self.entries():
            if store_id is None or path.parent.name == store_id:
                _unlink(path)
                freed += size
        return freed


def report_decoded_cache(cache: DecodedCache) -> None:
    """One line on stderr: what the cache served and kept, and whether its limit was in the way."""
    s = cache.stats
    held = sum(b for _, b in cache.usage().values())
    line = (f"decoded cache {cache.root}: {s.hits} segment read(s) from it, {s.written} decoded and kept, "
            f"{held / 2**30:.2f} of {cache.limit / 2**30:.2f} GiB used")
    if s.skipped:
        line += f"; {s.skipped} not kept (the limit is full of entries in use: raise --decoded-cache)"
    if s.rejected:
        line += f"; {s.rejected} failed their check and were read from the store"
    print(line, file=sys.stderr)


def _decode(store, segment: str, ranges: list[list[tuple[int, int]]], layers: list[int]) -> list[np.ndarray]:
    """Each example's (n, L', d) stored values, its own C-contiguous array, from one read of the segment."""
    lo = min(a for r in ranges for a, _ in r)
    hi = max(b for r in ranges for _, b in r)
    block = store.read_tokens(segment, lo, hi, layers, decode=False)  # (L', hi - lo, d)
    out = []
    for r in ranges:
        parts = [block[:, a - lo : b - lo].transpose(1, 0, 2) for a, b in r]  # each (k, L', d), k summing to n
        out.append(parts[0].copy() if len(parts) == 1 else np.ascontiguousarray(np.concatenate(parts, axis=0)))
    return out


class ReadBuffer:
    """A growable buffer that entries are read into, one per reading thread: once it has grown to the largest
    entry, a read allocates nothing (a fresh array per entry would be a MB-sized malloc and free per segment,
    the pattern that fragments a heap or, with the mmap threshold pinned, page-faults every time)."""

    def __init__(self) -> None:
        self._bytes = np.empty(0, dtype=np.uint8)

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` over the buffer; it is overwritten by the next take."""
        size = int(np.prod(shape)) * dtype.itemsize
        if self._bytes.nbytes < size:
            self._bytes = np.empty(size + size // 4, dtype=np.uint8)  # room for somewhat larger entries
        return self._bytes[:size].view(dtype).reshape(shape)


def read_entry(path: Path, buffer: ReadBuffer | None = None) -> list[np.ndarray] | None:
    """The examples an entry holds, each (n, L', d): views of one array the payload is read straight into
    (``buffer``'s, or a new one), or None when its header, length or any crc32c is not right. A missing file
    raises FileNotFoundError."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(MAGIC) + 8)
        if len(head) != len(MAGIC) + 8 or not head.startswith(MAGIC):
            return None
        header_len = int.from_bytes(head[len(MAGIC):], "little")
        try:
            header = json.loads(f.read(header_len))
            dtype, layers, width = np.dtype(header["dtype"]), int(header["layers"]), int(header["width"])
            counts = [(int(n), str(crc)) for n, crc in header["examples"]]
        except (ValueError, KeyError, TypeError):
            return None
        if dtype.hasobject or min((layers, width, *(n for n, _ in counts))) < 0:
            return None
        tokens = sum(n for n, _ in counts)
        if size != len(head) + header_len + tokens * layers * width * dtype.itemsize:
            return None
        shape = (tokens, layers, width)
        payload = np.empty(shape, dtype=dtype) if buffer is None else buffer.take(shape, dtype)
        if f.readinto(memoryview(payload).cast("B")) != payload.nbytes:
            return None
    out, start = [], 0
    for n, crc in counts:
        a = payload[start : start + n]
        if crc32c_hex(_read_only(a)) != crc:
            return None
        out.append(a)
        start += n
    return out


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view: crc32c takes read-only buffers only."""
    v = a.view()
    v.flags.writeable = False
    return v


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
