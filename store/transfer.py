"""Copying stores between roots: `store push`, `store pull`, and the uploads of `extract --root URL`.

The copy follows the commit protocol, so the destination is a valid store at every moment:

    plan.parquet, store.json        create-if-absent; an existing one must hold the same plan / identity
    per committed shard, in order:  a lease on the segment at the destination (store/lease.py: `gc` keeps
                                    away from it), the segment's files (each checked against the size and
                                    crc32c its commit recorded before it is written), one more LIST to check
                                    every file is there with its size (files a gc or a person removed
                                    meanwhile are sent again), its stats file, last the manifest part,
                                    create-if-absent; then the lease is dropped
    nothing else                    orphan segments, logs and temp files stay behind

Resumable: a shard whose part the destination already has is skipped, and so is a file already there with
its recorded size (on a local destination its crc32c is checked too; remote ones with ``verify_existing``).
An object PUT is atomic and checksummed by the server, so a present object is a complete one. Segment
names are unique per attempt, so a file at a segment's path can only be that segment's file.

Everything read from the source (part footers, file records, segment names) is validated before it becomes
a path at the destination: a damaged or hostile manifest cannot write outside the store.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from probecache.manifests.schema import ManifestError, part_file_name, read_part

from .errors import StoreError
from .header import parse_header
from .integrity import crc32c_hex, plan_digest
from .lease import LeaseKeeper
from .remote import check_store_name, clean_key
from .roots import LocalRoot, Root, open_root
from .scan import committed_parts, parse_segment
from .shard_commit import commit_shard

TRANSFER_THREADS = 4  # files in flight per shard: enough to fill a link, bounded memory (whole files)
COPY_ROUNDS = 3  # sends of one shard's missing files before the copy gives up (files deleted under it)


class DamagedSource(StoreError):
    """A source file or commit record is not what its commit recorded (the copy stops before committing)."""


@dataclass
class TransferReport:
    source: str
    destination: str
    store_id: str
    shards_total: int = 0
    shards_copied: list[int] = field(default_factory=list)
    shards_present: int = 0  # already committed at the destination
    shards_lost: list[int] = field(default_factory=list)  # committed by someone else while we copied
    files_copied: int = 0
    files_present: int = 0
    bytes_copied: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardRecord:
    """What a part says about its shard: its segment and {file: (size, crc32c)}, validated."""

    shard_id: int
    segment: str
    files: dict[str, tuple[int, str]]


def read_stats(part: bytes) -> dict:
    """The commit stats a part carries in its Parquet footer (see manifests/schema.py)."""
    meta = pq.read_schema(pa.BufferReader(part)).metadata or {}
    return json.loads(meta.get(b"probecache.shard_stats", b"{}"))


def shard_record(shard_id: int, part: bytes, where: str) -> ShardRecord:
    """The validated record of one part; StoreError when it cannot be trusted to name paths."""
    try:
        _, stats = read_part(part, where)  # checked against its digest: its names become paths
    except ManifestError as e:
        raise DamagedSource(str(e)) from e
    segment = stats.get("segment")
    attempt = parse_segment(segment) if isinstance(segment, str) else None
    if attempt is None or attempt.shard_id != shard_id:
        raise StoreError(f"{where}: names segment {segment!r}, not an attempt of shard {shard_id}")
    files = stats.get("files")
    if not isinstance(files, dict) or not files:
        raise StoreError(f"{where}: records no segment files (committed before checksums were recorded)")
    out = {}
    for rel, entry in files.items():
        if not (isinstance(entry, list) and len(entry) == 2):
            raise StoreError(f"{where}: malformed file record {rel!r}")
        out[clean_key(rel, f"{where}: file")] = (int(entry[0]), str(entry[1]))
    return ShardRecord(shard_id, segment, out)


def check_fetched(data: bytes | None, size: int, crc: str, where: str) -> bytes:
    """``data`` if it is exactly the recorded file; StoreError naming the damage otherwise."""
    if data is None:
        raise DamagedSource(f"{where}: recorded file is missing (run `probecache store verify` on the source)")
    if len(data) != size:
        raise DamagedSource(f"{where}: {len(data)} bytes, {size} recorded (truncated or rewritten)")
    actual = crc32c_hex(data)
    if actual != crc:
        raise DamagedSource(f"{where}: crc32c {actual}, {crc} recorded (corrupted)")
    return data


# ---- the header ------------------------------------------------------------------------------------------


def copy_header(src: Root, dst: Root) -> dict:
    """plan.parquet then store.json, create-if-absent at ``dst``; returns the source's store.json.

    An existing destination header must describe the same extraction (identity) and the same plan."""
    raw = src.get("store.json")
    if raw is None:
        raise StoreError(f"{src.url} is not a probecache store (no store.json): pass <root>/<store_id>")
    info = parse_header(raw, f"{src.url}/store.json")
    recorded = info["plan"].get("sha256")
    plan = src.get("plan.parquet")
    if plan is None or _plan_digest(plan) != recorded:
        raise StoreError(f"{src.url}/plan.parquet is missing or differs from store.json: run `probecache store "
                         "verify` on the source")
    if not dst.put_if_absent("plan.parquet", plan):
        existing = dst.get("plan.parquet")
        if existing is None or _plan_digest(existing) != recorded:
            raise StoreError(f"{dst.url} holds another plan for this store id (the data or tokenizer changed "
                             "under the same identity): copy elsewhere or remove it")
    if not dst.put_if_absent("store.json", raw):
        try:
            theirs = json.loads(dst.get("store.json") or b"{}")
        except ValueError:
            theirs = {}
        if theirs.get("identity") != info.get("identity") or theirs.get("store_id") != info.get("store_id"):
            raise StoreError(f"{dst.url} holds a different extraction under this name: copy elsewhere")
    return info


def _plan_digest(data: bytes) -> str | None:
    try:
        return plan_digest(pq.read_table(pa.BufferReader(data)))
    except Exception:  # a damaged plan is reported by the caller as a mismatch
        return None


# ---- one shard ---------------------------------------------------------------------------------------------


def copy_shard(src: Root, dst: Root, shard_id: int, report: TransferReport, part: bytes | None = None,
               verify_existing: bool | None = None, pool: ThreadPoolExecutor | None = None,
               leases: LeaseKeeper | None = None) -> bool:
    """Copy one committed shard: lease, segment files, check, stats, then the part (create-if-absent).

    Returns True when this call committed the part at ``dst`` (False: it was committed by someone else
    first, and what we uploaded is an orphan segment for `gc`). ``leases`` holds the destination's leases
    (one keeper, one heartbeat thread, for a whole copy); without it this call makes its own."""
    name = part_file_name(shard_id)
    part = part if part is not None else src.get(f"manifests/{name}")
    if part is None:
        raise StoreError(f"{src.url}/manifests/{name}: shard {shard_id} is not committed at the source")
    record = shard_record(shard_id, part, f"{src.url}/manifests/{name}")
    seg = f"segments/{record.segment}"
    if verify_existing is None:
        verify_existing = isinstance(dst, LocalRoot)  # a local crc32c is cheap; a remote one is a download
    keeper = leases if leases is not None else LeaseKeeper(dst)
    keeper.hold(record.segment)  # before the first object: gc never sees this segment unleased while we copy
    try:
        present = dst.list(seg)

        def one(item: tuple[str, tuple[int, str]]) -> tuple[bool, int]:
            rel, (size, crc) = item
            where = f"{seg}/{rel}"
            have = present.get(rel)
            if have is not None and have.size == size:
                if not verify_existing:
                    return False, 0
                existing = dst.get(where)
                if existing is not None and len(existing) == size and crc32c_hex(existing) == crc:
                    return False, 0
            data = check_fetched(src.get(where), size, crc, f"{src.url}/{where}")
            dst.put(where, data)
            return True, size

        stats = src.get(f"stats/{record.segment}.json")  # informational (`store status`); never trusted
        items = sorted(record.files.items())
        for _ in range(COPY_ROUNDS):
            results = pool.map(one, items) if pool is not None else map(one, items)
            for copied, size in results:
                if copied:
                    report.files_copied += 1
                    report.bytes_copied += size
                else:
                    report.files_present += 1
            # the commit checks every recorded file is at the destination with its size first. A file removed
            # meanwhile (a gc that ignored or outlived our lease, a person) is sent again, never committed missing
            outcome = commit_shard(dst, shard_id, record.segment, record.files, part, stats, keeper)
            if outcome.damage is None:
                break
            present = dst.list(seg)
            items = [(rel, entry) for rel, entry in sorted(record.files.items())
                     if rel not in present or present[rel].size != entry[0]]
            verify_existing = False  # what is present now was just checked against the record
        else:
            raise StoreError(f"{dst.url}/{seg}: {len(items)} files vanished again after being copied "
                             f"{COPY_ROUNDS} times ({items[0][0] if items else '?'}, ...): stop whatever deletes "
                             f"objects under {dst.url}/segments (a `probecache store gc` older than leases, a "
                             "lifecycle rule) and rerun")
        committed = outcome.committed
    finally:
        keeper.release(record.segment)
        if leases is None:
            keeper.close()
    (report.shards_copied if committed else report.shards_lost).append(shard_id)
    return committed


# ---- whole stores ------------------------------------------------------------------------------------------


def copy_store(src: Root, dst: Root, verify_existing: bool | None = None,
               on_shard: Callable[[int, bool], None] | None = None) -> TransferReport:
    """Copy every committed shard of ``src`` that ``dst`` lacks (see the module docstring)."""
    info = copy_header(src, dst)
    report = TransferReport(src.url, dst.url, info["store_id"], shards_total=int(info["plan"]["n_shards"]))
    have = committed_parts(dst)
    leases = LeaseKeeper(dst)
    try:
        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            for shard_id in sorted(committed_parts(src)):
                if shard_id in have:
                    report.shards_present += 1
                    continue
                committed = copy_shard(src, dst, shard_id, report, verify_existing=verify_existing, pool=pool,
                                       leases=leases)
                if on_shard is not None:
                    on_shard(shard_id, committed)
    finally:
        leases.close()
    return report


def store_id_of(root: Root) -> str:
    raw = root.get("store.json")
    if raw is None:
        raise StoreError(f"{root.url} is not a probecache store (no store.json): pass <root>/<store_id> "
                         "(`probecache store ls ROOT` lists them)")
    try:
        return check_store_name(json.loads(raw)["store_id"])
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"{root.url}/store.json is damaged") from None


def destination(store_id: str, target: str) -> Root:
    """``target`` names the store itself when its last component is the store id, else a root to put it in."""
    root = open_root(target)
    name = root.url.rstrip("/").rsplit("/", 1)[-1]
    return root if name == store_id else root.child(store_id)


def push(local_store: str, url: str, verify_existing: bool = False, progress: bool = False) -> TransferReport:
    """`probecache store push LOCAL URL`."""
    src = open_root(local_store)
    return _run(src, destination(store_id_of(src), url), verify_existing, progress)


def pull(url: str, local: str, progress: bool = False) -> TransferReport:
    """`probecache store pull URL LOCAL`: ``local`` is the store folder or a root to create it in."""
    src = open_root(url)
    return _run(src, destination(store_id_of(src), local), None, progress)


def _run(src: Root, dst: Root, verify_existing: bool | None, progress: bool) -> TransferReport:
    def on_shard(shard_id: int, committed: bool) -> None:
        if progress:
            what = "copied" if committed else "already committed there by another writer"
            print(f"shard {shard_id}: {what}", file=sys.stderr)

    return copy_store(src, dst, verify_existing=verify_existing, on_shard=on_shard)
