"""`gc`: remove what killed or losing attempts left behind; never anything a commit record references, never a
segment that is still being written, never a name gc did not create, never through a symbolic link. One
algorithm for every kind of root (store/remote.py ``Root``); how a tree is removed is the root's business.

gc first refuses a folder it cannot trust, deleting nothing (one line naming the fix):
    store.json must be a valid header (store/header.py) whose store_id is the folder's (or prefix's) name
    segments/, manifests/, stats/ and leases/ must be real folders, not links
    the store must verify structurally (verify_store(checksums=False): store.json, plan, every part readable
    and a commit of its own shard, every referenced segment present with every recorded file at its recorded
    size, manifests/ present). A store with its manifests deleted, or a part overwritten by another shard's,
    would otherwise make committed segments look like orphans.

What goes, once older than ``--older-than`` (default 6 h):
    orphan segments   segments/shard-NNNNN-<YYYYmmddTHHMMSS>-<8 hex>/ (the writer's exact pattern, a real folder)
                      that no part references and whose lease (store/lease.py) is stale or absent: a fresh
                      lease keeps a segment whatever --older-than says
    their stats       stats/<segment>.json (and stats files whose segment is already gone)
    their leases      leases/<segment>.json once stale and their segment gone
    temp files        .probecache-tmp-<name>-<machine>-<pid>-<32 hex> in the store folder, manifests/ and
                      leases/ (a write killed before its rename or link). Never while the writer its name records
                      is running on this machine; a writer on another machine is given the lease TTL as well.
                      Of the older temp names only manifests/.tmp-part-NNNNN.parquet-<32 hex> is recognised, and
                      only when it is a part of that very shard; other ``.tmp-*`` files are left alone: a user
                      may own them.
    set-aside parts   manifests/.probecache-broken-part-*.parquet (commit records `extract` moved aside)

Age is the later of the attempt's start (in its name) and its folder's newest mtime (a running attempt writes at
least once per zarr shard). Symbolic links are never followed: a link in segments/ is skipped and reported.

Right before a segment goes, gc asks again whether a part references it or a live lease holds it (a writer that
was suspended may have woken up: it refreshes its lease before its own last check, extract/shard.py and
store/transfer.py). On a local disk the segment is first renamed to ``segments/.probecache-deleting-<name>``,
asked about again, then removed (or renamed back): a gc killed after the rename leaves a hidden folder no
reader references, and the next gc finishes it (or restores it, by the same checks). ``.deleting-<segment
name>`` folders of older versions are handled the same way. On object storage (no rename) the objects are
deleted one by one after the check; an upload checks its objects once more before it commits, so even a lease
that expired under a suspended uploader cannot make it commit a segment gc deleted.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from probecache.manifests.schema import part_stats

from .commit import TEMP_NAME
from .errors import StoreError
from .lease import LEASE_TTL_SECONDS, LEASES, read_lease, writer_alive
from .remote import clean_key
from .repair import BROKEN_NAME
from .roots import DELETING, LEGACY_DELETING, ObjectInfo, Root
from .scan import committed_parts, deleting_target, open_store_root, parse_segment
from .status import format_duration
from .verify import verify_store

DEFAULT_OLDER_THAN = 6 * 3600.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
AGE_FORMS = "0, or a whole number with a unit: 30s, 15m, 6h, 2d"
_LEGACY_PART_TEMP = re.compile(r"\.tmp-part-(\d{5,})\.parquet-[0-9a-f]{32}")  # fullmatch


@dataclass
class Removal:
    kind: str  # "segment" | "deleting" (finishing an interrupted gc) | "stats" | "lease" | "temp" | "broken-part"
    path: str  # relative to the store folder
    bytes: int
    age_seconds: float | None  # None for half-deleted segments (removed whatever their age)
    reason: str | None = None  # for kept items: why (a live lease, too young)


@dataclass
class GcReport:
    path: str
    dry_run: bool
    older_than_seconds: float
    removed: list[Removal] = field(default_factory=list)  # or, with dry_run, what would be removed
    kept: list[Removal] = field(default_factory=list)  # unreferenced but leased or too young
    restored: list[str] = field(default_factory=list)  # half-deleted segments put back (committed or leased)
    skipped: list[str] = field(default_factory=list)  # things gc will not touch (links): one line each

    @property
    def bytes_freed(self) -> int:
        return sum(r.bytes for r in self.removed)

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_freed": self.bytes_freed}


def parse_age(text: str) -> float:
    """Seconds from ``0``, ``30s``, ``15m``, ``6h``, ``2d``; ValueError naming the accepted forms otherwise."""
    if text.strip() == "0":
        return 0.0
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if m is None:
        raise ValueError(f"bad age {text!r}: use {AGE_FORMS}")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def gc_store(store: str | os.PathLike | Root, older_than_seconds: float = DEFAULT_OLDER_THAN, dry_run: bool = False,
             now: float | None = None) -> GcReport:
    """Remove (or with ``dry_run`` only list) unreferenced, unleased debris older than ``older_than_seconds``.

    StoreError, deleting nothing, when ``store`` is not a store gc can trust (see the module docstring).
    ``now`` (tests) stands for the current time in every age and lease decision.
    """
    root, info = open_store_root(store)
    where = root.url
    if info.get("store_id") != root.name:
        raise StoreError(f"{where}: store.json names store {info.get('store_id')!r} but the folder is {root.name!r}: "
                         "gc runs only on a <root>/<store_id> folder that probecache wrote (rename it back to its "
                         "store id); nothing was deleted")
    for folder in sorted({"segments", "manifests", "stats", LEASES} & set(root.links(""))):
        raise StoreError(f"{where}/{folder} is a symbolic link: gc never follows links, so it deletes nothing here "
                         "(make it a real folder)")
    report = GcReport(where, dry_run, older_than_seconds)
    if not dry_run:
        # a gc killed between its rename and its second look, while a writer committed that very segment, left a
        # part pointing at a hidden folder: put it back first (it is ours; the store is whole again)
        try:
            committed = _referenced(root)
        except StoreError:
            committed = set()  # verify names the unreadable part below
        present = set(root.list_dir("segments", hidden=True)[0]) - set(root.links("segments"))
        for name in sorted(committed):
            for prefix in (DELETING, LEGACY_DELETING) if name not in present and parse_segment(name) else ():
                if prefix + name in present and root.rename(f"segments/{prefix}{name}", f"segments/{name}"):
                    report.restored.append(f"segments/{name}")
                    break
    problems = verify_store(root, checksums=False).problems
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"{where} does not verify, so gc deletes nothing: {problems[0]}{more}. Rerun the extract "
                         "command to repair it (parts whose segment is missing are extracted again), then "
                         "`probecache store verify`")
    now = time.time() if now is None else now
    referenced = _referenced(root)

    def in_use(name: str) -> bool:
        """Committed since we listed, or a writer holds it (asked again right before and after a local rename)."""
        part = root.get(f"manifests/part-{parse_segment(name).shard_id:05d}.parquet")
        if part is not None and name in _segments_of(part, where):
            return True
        lease = read_lease(root, name, now)
        return lease is not None and lease.fresh

    links = root.links("segments")
    report.skipped += [f"segments/{n}: a symbolic link (gc never follows links; remove it by hand if it is not "
                       "needed)" for n in links]
    folders = sorted(set(root.list_dir("segments", hidden=True)[0]) - set(links))
    handled: set[str] = set()  # segment names whose stats and lease were dealt with alongside the segment

    # 1. finish (or undo) deletions an interrupted gc started
    for hidden in folders:
        name = deleting_target(hidden)
        if name is None:
            continue
        handled.add(name)
        if name in referenced or in_use(name):
            if not dry_run and root.rename(f"segments/{hidden}", f"segments/{name}"):
                report.restored.append(f"segments/{name}")
            continue
        report.removed.append(Removal("deleting", f"segments/{hidden}", root.tree(f"segments/{hidden}")[0], None))
        if not dry_run:
            root.delete_tree(f"segments/{hidden}")
        _remove_companions(root, name, report, dry_run, None)

    # 2. orphan segments: killed attempts, losers of a commit race, attempts of shards not yet committed
    for name in folders:
        attempt = parse_segment(name)
        if attempt is None or name in referenced or name in handled:
            continue
        size, newest = root.tree(f"segments/{name}")
        age = now - max(attempt.started, newest)
        item = Removal("segment", f"segments/{name}", size, round(age, 1))
        lease = read_lease(root, name, now)
        if lease is not None and lease.fresh:
            item.reason = f"lease: {lease.why}"
            report.kept.append(item)
            continue
        if age < older_than_seconds:
            item.reason = "too young"
            report.kept.append(item)
            continue
        if not dry_run and not root.remove_tree(f"segments/{name}", lambda n=name: in_use(n)):
            continue  # committed or leased meanwhile, or another gc got there first
        report.removed.append(item)
        _remove_companions(root, name, report, dry_run, age)
        handled.add(name)

    # 3. stats and leases whose segment is gone (a crash between removing a segment and them; attempts killed
    # before their folder existed)
    present = {deleting_target(n) or n for n in folders}
    for kind, folder in (("stats", "stats"), ("lease", LEASES)):
        for file, meta in _files(root, folder, hidden=False):
            name = file.removesuffix(".json")
            if (not file.endswith(".json") or parse_segment(name) is None or name in handled or name in referenced
                    or name in present):
                continue  # an orphan kept above keeps its stats and lease
            if kind == "lease" and (lease := read_lease(root, name, now)) is not None and lease.fresh:
                continue  # an attempt about to create its folder
            _remove_old(root, f"{folder}/{file}", meta, kind, report, now)

    # 4. temp files of writes killed before their link or rename; records `extract` set aside
    for folder in ("", "manifests", LEASES):
        for file, meta in _files(root, folder, hidden=True):
            rel = f"{folder}/{file}" if folder else file
            if (m := TEMP_NAME.fullmatch(file)) is not None:
                alive = writer_alive(m.group(2), int(m.group(3)))
                if alive:
                    continue  # its writer is about to link or rename it into place
                # a writer gc cannot check (another machine) may still be writing: wait out the lease TTL too
                _remove_old(root, rel, meta, "temp", report, now, min_age=0.0 if alive is False else LEASE_TTL_SECONDS)
            elif folder == "manifests" and _legacy_part_temp(root, file):
                _remove_old(root, rel, meta, "temp", report, now)
            elif folder == "manifests" and BROKEN_NAME.fullmatch(file):
                _remove_old(root, rel, meta, "broken-part", report, now)
    return report


def _files(root: Root, folder: str, hidden: bool) -> list[tuple[str, ObjectInfo]]:
    """Files directly in ``folder`` that gc may name as keys: no links, no name a key cannot hold."""
    _, files = root.list_dir(folder, hidden=hidden)
    links = set(root.links(folder))
    out = []
    for name, meta in sorted(files.items()):
        try:
            clean_key(name)
        except StoreError:
            continue  # not a name probecache writes (a control character, a wildcard): never ours
        if name not in links:
            out.append((name, meta))
    return out


def _referenced(root: Root) -> set[str]:
    referenced: set[str] = set()
    for name in committed_parts(root).values():
        part = root.get(f"manifests/{name}")
        if part is not None:  # None: set aside by a repairing extract since we listed it
            referenced |= _segments_of(part, f"{root.url}/manifests/{name}")
    return referenced


def _segments_of(part: bytes, where: str) -> set[str]:
    """Every segment a part references (its stats and its rows; they agree unless the part is damaged)."""
    try:
        names = set(pq.read_table(pa.BufferReader(part), columns=["segment"])["segment"].to_pylist())
        stats_segment = part_stats(pa.BufferReader(part)).get("segment")
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StoreError(f"{where} cannot be read ({type(e).__name__}: {e}): gc will not delete anything while "
                         "a commit record is unreadable; run `probecache store verify`") from e
    return names | ({stats_segment} if isinstance(stats_segment, str) else set())


def _remove_companions(root: Root, name: str, report: GcReport, dry_run: bool, age: float | None) -> None:
    """The stats file and the (stale) lease of a removed segment."""
    for kind, rel in (("stats", f"stats/{name}.json"), ("lease", f"{LEASES}/{name}.json")):
        meta = root.info(rel)
        if meta is None:
            continue
        report.removed.append(Removal(kind, rel, meta.size, None if age is None else round(age, 1)))
        if not dry_run:
            root.delete(rel)


def _legacy_part_temp(root: Root, name: str) -> bool:
    """An older version's commit temp file, recognised only when provably ours: named for a part, and holding a
    commit record of that very shard."""
    m = _LEGACY_PART_TEMP.fullmatch(name)
    if m is None:
        return False
    try:
        stats = part_stats(pa.BufferReader(root.get(f"manifests/{name}") or b""))
    except Exception:  # not a Parquet part: not ours
        return False
    attempt = parse_segment(stats.get("segment"))
    return attempt is not None and attempt.shard_id == int(m.group(1)) == stats.get("shard_id")


def _remove_old(root: Root, rel: str, meta: ObjectInfo, kind: str, report: GcReport, now: float,
                min_age: float = 0.0) -> None:
    age = now - meta.mtime
    # a temp file still hard-linked to its part (killed after the link) frees nothing when unlinked
    item = Removal(kind, rel, meta.size if meta.nlink == 1 else 0, round(age, 1))
    if age < max(report.older_than_seconds, min_age):
        item.reason = "too young"
        report.kept.append(item)
        return
    report.removed.append(item)
    if not report.dry_run:
        root.delete(rel)


def format_gc(report: GcReport, limit: int = 20) -> list[str]:
    """The human report of `probecache store gc`."""
    verb = "would remove" if report.dry_run else "removed"
    counts: dict[str, int] = {}
    for r in report.removed:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "nothing"
    lines = [f"{verb} {summary}: {report.bytes_freed / 1e6:,.1f} MB"
             + (" (dry run: nothing was deleted)" if report.dry_run else "")]
    for r in report.removed[:limit]:
        age = "" if r.age_seconds is None else f", idle {format_duration(r.age_seconds)}"
        lines.append(f"  {r.kind:<8} {r.path}  ({r.bytes / 1e6:,.2f} MB{age})")
    if len(report.removed) > limit:
        lines.append(f"  ... and {len(report.removed) - limit} more")
    leased = [r for r in report.kept if (r.reason or "").startswith("lease")]
    young = [r for r in report.kept if r not in leased]
    if leased:
        lines.append(f"kept {len(leased)} segment(s) with a live lease (being written): {_shown(leased)}")
    if young:
        lines.append(f"kept {len(young)} unreferenced item(s) younger than "
                     f"{format_duration(report.older_than_seconds)} (maybe still being written): {_shown(young)}")
    for path in report.restored:
        lines.append(f"restored {path}: a half-deleted segment that is committed or leased after all")
    lines += [f"skipped {line}" for line in report.skipped]
    return lines


def _shown(items: list[Removal]) -> str:
    return ", ".join(r.path for r in items[:5]) + (" ..." if len(items) > 5 else "")
