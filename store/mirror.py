"""Reading a store on object storage: the reader's ``Store`` over a local mirror that fills itself on demand.

    open_store("s3://bucket/prefix/<store_id>")
      at open      store.json, plan.parquet and manifests/ are synced into the mirror (one LIST of the store,
                   one GET of store.json, one LIST of manifests/, a GET per part not mirrored yet)
      on a read    the zarr files the read touches are fetched whole (a zarr shard file holds every layer of
                   1024 tokens; a per-example array is one file), checked against the size and crc32c the
                   shard's commit recorded, and written into the mirror; later reads are local
      eviction     whole segments, least recently used first, once the mirror's segments exceed the cap
                   ($PROBECACHE_REMOTE_CACHE_SIZE, default 20G; 0 keeps only what is being read)

Why whole files and not the byte ranges zarr would ask for: zarr-python 3.1 reads a sharded array on a
remote store with one range request for the shard index plus one per inner chunk (no coalescing), i.e.
~L+2 requests for one example's tokens on one zarr shard, each with the store's latency; a whole-file GET is
one request and can be verified against the commit record (a range cannot). bench/remote.py measures both.

Only GET and LIST are used: read-only credentials suffice. ``open_store(URL)`` (reader.py) builds a ``Mirror``
and hands it to a plain ``Store``: training and the reader API run unchanged, since they reach arrays through
``Store._segment_store`` (a ``FetchingStore`` here) and the manifest through ``store.layout`` (the mirror). This
module knows nothing of the reader. The mirror lives in $PROBECACHE_CACHE/remote/<hash of the root URL>/<store_id>/.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from probecache.manifests.schema import PART_NAME, committed_part_files

from .errors import StoreError
from .header import parse_header
from .integrity import crc32c_hex
from .remote import cache_dir, check_store_name, location_digest, parse_url
from .roots import LocalRoot, ObjectRoot, Root
from .transfer import check_fetched
from .verified import CheckedFiles, FileRecord, VerifiedSegmentStore, read_off_heap

DEFAULT_CACHE_SIZE = "20G"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_EVICTING = ".evicting-"


def parse_size(text: str | int) -> int:
    """Bytes from 123, 500M, 20G, 1.5T (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if m is None:
        raise StoreError(f"cache size {text!r}: use a number of bytes or 500M, 20G, 1.5T")
    return int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))


def cache_limit(explicit: str | int | None = None) -> int:
    return parse_size(explicit if explicit is not None else
                      os.environ.get("PROBECACHE_REMOTE_CACHE_SIZE") or DEFAULT_CACHE_SIZE)


# ---- the size-capped segment cache ---------------------------------------------------------------------------


class SegmentCache:
    """Accounts the bytes of mirrored segments under $PROBECACHE_CACHE/remote and evicts whole segments, LRU.

    A segment's folder mtime is its last use (touched on first use per process and on every fetch). Several
    processes may share the cache: eviction renames a folder away before deleting it, and a reader whose file
    vanished fetches it again (FetchingStore.get), so a concurrent eviction costs a download, never data."""

    def __init__(self, base: Path, limit: int):
        self.base, self.limit = base, limit
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes, scanned lazily, then kept up to date by this process

    def _segment_dirs(self) -> list[Path]:
        return [p for p in self.base.glob("*/*/segments/*") if p.is_dir() and not p.name.startswith(".")]

    @staticmethod
    def _bytes(folder: Path) -> int:
        return LocalRoot(folder).tree("")[0]

    def touch(self, segment_dir: Path) -> None:
        try:
            os.utime(segment_dir)
        except FileNotFoundError:
            pass

    def added(self, nbytes: int, segment_dir: Path) -> None:
        """Count a fetched file; evict other segments, least recently used first, while over the limit."""
        with self._lock:
            if self._used is None:
                self._used = sum(self._bytes(p) for p in self._segment_dirs())
            else:
                self._used += nbytes
            self.touch(segment_dir)
            if self._used <= self.limit:
                return
            # other processes add and evict too: count again before deciding what to delete
            sizes = {p: self._bytes(p) for p in self._segment_dirs()}
            self._used = sum(sizes.values())
            keep = segment_dir.resolve()
            for folder in sorted(sizes, key=_mtime):
                if self._used <= self.limit:
                    break
                if folder.resolve() == keep:
                    continue
                hidden = folder.parent / f"{_EVICTING}{folder.name}-{uuid.uuid4().hex[:8]}"
                try:
                    folder.rename(hidden)
                except FileNotFoundError:
                    continue  # another process evicted it
                shutil.rmtree(hidden, ignore_errors=True)
                self._used -= sizes[folder]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


_caches: dict[tuple[Path, int], SegmentCache] = {}


def segment_cache(limit: int) -> SegmentCache:
    base = cache_dir() / "remote"
    key = (base, limit)
    if key not in _caches:
        _caches[key] = SegmentCache(base, limit)
    return _caches[key]


# ---- the zarr store that fetches whole files ---------------------------------------------------------------


class FetchingStore(VerifiedSegmentStore):
    """A read-only zarr store over one mirrored segment folder; a recorded file missing locally (or not the
    recorded bytes) is fetched whole from ``remote`` into the mirror. Every file is checked against its
    commit record before zarr sees a byte of it (VerifiedSegmentStore), fetched or not.

    Only files in the commit record exist for zarr: a stray object next to a committed segment is never read.
    """

    def __init__(self, root: Path, files: FileRecord, remote: Root, cache: SegmentCache, checked: CheckedFiles,
                 where: str):
        Path(root).mkdir(parents=True, exist_ok=True)
        super().__init__(root, files, checked, where)
        self.remote, self.cache = remote, cache
        self.fetched_bytes = 0
        self.cache.touch(self.root)

    def _load(self, key: str) -> bytes | np.ndarray:
        """The mirrored file if it is the recorded one, else a fresh fetch written into the mirror. A file evicted
        by another process meanwhile is simply fetched again."""
        size, crc = self.files[key]
        path = self.root / key
        try:
            local = read_off_heap(path)
            if len(local) == size and crc32c_hex(local) == crc:
                return local
        except FileNotFoundError:
            pass
        data = check_fetched(self.remote.get(key), size, crc, f"{self.remote.url}/{key}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.fetched_bytes += size
        self.cache.added(size, self.root)
        return data


# ---- the mirror of one store ---------------------------------------------------------------------------------


class Mirror:
    """The store at ``url`` mirrored locally: its header and manifests synced at open, segment files fetched on
    first read (through ``segment_store``), all under ``path``."""

    def __init__(self, url: str, cache_size: str | int | None = None):
        location = parse_url(url)
        if not location.prefix:
            raise StoreError(f"{location.url}: pass <root>/<store_id>, not a bucket")
        self.url = location.url
        self.root = ObjectRoot(location)
        self.path = mirror_dir(self.url)
        sync_metadata(self.root, self.path)
        self.cache = segment_cache(cache_limit(cache_size))

    def segment_store(self, segment: str, files: FileRecord, checked: CheckedFiles) -> FetchingStore:
        return FetchingStore(self.path / "segments" / segment, files, self.root.child(f"segments/{segment}"),
                             self.cache, checked, f"{self.url}/segments/{segment}")


def mirror_dir(location_url: str) -> Path:
    parent, _, name = location_url.rpartition("/")
    return cache_dir() / "remote" / location_digest(parent) / check_store_name(name)


def sync_metadata(root: Root, mirror: Path) -> None:
    """store.json, plan.parquet and manifests/ of ``root`` into ``mirror`` (parts are immutable once
    committed, so a mirrored part with the listed size is current; parts gone remotely are dropped)."""
    _, top = root.list_dir("")
    raw = root.get("store.json") if "store.json" in top else None
    if raw is None:
        raise StoreError(f"{root.url} is not a probecache store (no store.json): pass <root>/<store_id> "
                         "(`probecache store ls ROOT` lists them)")
    parse_header(raw, f"{root.url}/store.json")  # a damaged header never reaches the mirror
    mirror.mkdir(parents=True, exist_ok=True)
    manifests = mirror / "manifests"
    store_json = mirror / "store.json"
    if store_json.is_file() and store_json.read_bytes() != raw:
        shutil.rmtree(manifests, ignore_errors=True)  # another store was created under this name: start over
    _write(store_json, raw)
    plan = mirror / "plan.parquet"
    if "plan.parquet" not in top:
        plan.unlink(missing_ok=True)  # verify reports a missing plan; a stale mirrored one would hide it
    elif not plan.is_file() or plan.stat().st_size != top["plan.parquet"].size:
        data = root.get("plan.parquet")
        if data is not None:
            _write(plan, data)
    _, listed = root.list_dir("manifests")
    remote_parts = {name: info.size for name, info in listed.items() if PART_NAME.match(name)}
    manifests.mkdir(exist_ok=True)
    for local in committed_part_files(manifests):
        if remote_parts.get(local.name) != local.stat().st_size:
            local.unlink(missing_ok=True)
    missing = [n for n in remote_parts if not (manifests / n).is_file()]

    def fetch(name: str) -> None:
        data = root.get(f"manifests/{name}")
        if data is not None:
            _write(manifests / name, data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, missing))


def _write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    os.replace(tmp, path)
