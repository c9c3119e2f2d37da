"""`gc`: remove what killed or losing attempts left behind; never anything a commit record references, never a
segment that is still being written, never a name gc did not create, never through a symbolic link.

gc first refuses a folder it cannot trust, deleting nothing (one line naming the fix):
    store.json must be a valid header (store/header.py) whose store_id is the folder's name
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

A segment is deleted by renaming it to ``segments/.probecache-deleting-<name>``, then checking again that no
part references it and no live lease holds it (a writer that was suspended may have woken up: it refreshes
its lease before its own last check, extract/shard.py), then removing the tree; if either check fails the
folder is renamed back. A gc killed after the rename leaves a hidden folder no reader references; the next
gc finishes it (or restores it, by the same checks). ``.deleting-<segment name>`` folders of older versions
are handled the same way: their names are the writer's exact segment pattern, so they are ours.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from probecache.manifests.schema import part_stats

from .commit import TEMP_NAME
from .errors import StoreError
from .faults import crash_point
from .layout import StoreLayout
from .lease import LEASE_TTL_SECONDS, LEASES, local_lease, writer_alive
from .repair import BROKEN_NAME, restore_half_deleted
from .status import (
    DELETING,
    LEGACY_DELETING,
    deleting_target,
    format_duration,
    newest_mtime,
    open_layout,
    parse_segment,
    part_files,
    segment_attempts,
)
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


def check_gc_header(info: dict, folder_name: str, where: str) -> None:
    """A header read_header accepted must also be this folder's: stores live at <root>/<store_id>."""
    if info.get("store_id") != folder_name:
        raise StoreError(f"{where}: store.json names store {info.get('store_id')!r} but the folder is {folder_name!r}: "
                         "gc runs only on a <root>/<store_id> folder that probecache wrote (rename it back to its "
                         "store id); nothing was deleted")


def refuse_unverified(problems: list[str], where: str) -> None:
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"{where} does not verify, so gc deletes nothing: {problems[0]}{more}. Rerun the extract "
                         "command to repair it (parts whose segment is missing are extracted again), then "
                         "`probecache store verify`")


def gc_store(path: str | Path, older_than_seconds: float = DEFAULT_OLDER_THAN, dry_run: bool = False,
             now: float | None = None) -> GcReport:
    """Remove (or with ``dry_run`` only list) unreferenced, unleased debris older than ``older_than_seconds``.

    StoreError, deleting nothing, when ``path`` is not a store gc can trust (see the module docstring).
    ``now`` (tests) stands for the current time in every age and lease decision.
    """
    layout, info = open_layout(path)
    where = str(layout.path)
    check_gc_header(info, Path(os.path.abspath(layout.path)).name, where)
    for folder in (layout.segments, layout.manifests, layout.stats, layout.path / LEASES):
        if folder.is_symlink():
            raise StoreError(f"{folder} is a symbolic link: gc never follows links, so it deletes nothing here "
                             "(make it a real folder)")
    report = GcReport(where, dry_run, older_than_seconds)
    if not dry_run:
        # a gc killed between its rename and its second look, while a writer committed that very segment, left a
        # part pointing at a hidden folder: put it back first (it is ours; the store is whole again)
        try:
            committed = _referenced(layout)
        except StoreError:
            committed = set()  # verify names the unreadable part below
        report.restored += [f"segments/{name}" for name in sorted(committed) if restore_half_deleted(layout, name)]
    refuse_unverified(verify_store(layout.path, checksums=False).problems, where)
    now = time.time() if now is None else now
    referenced = _referenced(layout)

    def alive(name: str, shard: int) -> bool:
        """Committed since we listed, or a writer holds it (asked again right before and after each rename)."""
        part = layout.part(shard)
        if part.exists() and name in _segments_of(part):
            return True
        lease = local_lease(layout.path, name, now)
        return lease is not None and lease.fresh

    handled: set[str] = set()  # segment names whose stats and lease were dealt with alongside the segment
    entries = sorted(os.scandir(layout.segments), key=lambda e: e.name) if layout.segments.is_dir() else []
    for entry in entries:
        if entry.is_symlink():
            report.skipped.append(f"segments/{entry.name}: a symbolic link (gc never follows links; remove it by "
                                  "hand if it is not needed)")

    # 1. finish (or undo) deletions an interrupted gc started
    for entry in entries:
        name = deleting_target(entry.name)
        if name is None or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        attempt = parse_segment(name)
        if name in referenced or alive(name, attempt.shard_id):
            if not dry_run and _restore(folder, layout.segments / name):
                report.restored.append(f"segments/{name}")
            handled.add(name)
            continue
        report.removed.append(Removal("deleting", _rel(layout, folder), tree_bytes(folder), None))
        if not dry_run:
            _rmtree(folder)
        _remove_companions(layout, name, report, dry_run, None, now)
        handled.add(name)

    # 2. orphan segments: killed attempts, losers of a commit race, attempts of shards not yet committed
    for name, attempt in sorted(segment_attempts(layout).items()):
        if name in referenced or name in handled:
            continue
        folder = layout.segments / name
        age = now - max(attempt.started, newest_mtime(folder))
        item = Removal("segment", _rel(layout, folder), tree_bytes(folder), round(age, 1))
        lease = local_lease(layout.path, name, now)
        if lease is not None and lease.fresh:
            item.reason = f"lease: {lease.why}"
            report.kept.append(item)
            continue
        if age < older_than_seconds:
            item.reason = "too young"
            report.kept.append(item)
            continue
        if not dry_run and not _delete_segment(layout, folder, lambda n=name, a=attempt: alive(n, a.shard_id)):
            continue  # committed or leased meanwhile, or another gc got there first
        report.removed.append(item)
        _remove_companions(layout, name, report, dry_run, age, now)
        handled.add(name)

    # 3. stats and leases whose segment is gone (a crash between removing a segment and them; attempts killed
    # before their folder existed)
    for kind, folder, suffix in (("stats", layout.stats, ".json"), ("lease", layout.path / LEASES, ".json")):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name) if folder.is_dir() else []:
            name = entry.name.removesuffix(suffix)
            if (not entry.name.endswith(suffix) or parse_segment(name) is None or name in handled
                    or name in referenced or not entry.is_file(follow_symlinks=False)):
                continue
            if _segment_present(layout, name):
                continue  # an orphan kept above keeps its stats and lease
            if kind == "lease":
                lease = local_lease(layout.path, name, now)
                if lease is not None and lease.fresh:
                    continue  # an attempt about to create its folder
            _remove_old_file(layout, Path(entry.path), kind, report, dry_run, now)

    # 4. temp files of writes killed before their link or rename; records `extract` set aside
    for folder in (layout.path, layout.manifests, layout.path / LEASES):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name) if folder.is_dir() else []:
            if not entry.is_file(follow_symlinks=False):
                continue
            if (m := TEMP_NAME.fullmatch(entry.name)) is not None:
                alive = writer_alive(m.group(2), int(m.group(3)))
                if alive:
                    continue  # its writer is about to link or rename it into place
                # a writer gc cannot check (another machine) may still be writing: wait out the lease TTL too
                _remove_old_file(layout, Path(entry.path), "temp", report, dry_run, now,
                                 min_age=0.0 if alive is False else LEASE_TTL_SECONDS)
            elif folder == layout.manifests and _legacy_part_temp(Path(entry.path)):
                _remove_old_file(layout, Path(entry.path), "temp", report, dry_run, now)
            elif folder == layout.manifests and BROKEN_NAME.fullmatch(entry.name):
                _remove_old_file(layout, Path(entry.path), "broken-part", report, dry_run, now)
    return report


def _referenced(layout: StoreLayout) -> set[str]:
    referenced: set[str] = set()
    for part in part_files(layout).values():
        referenced |= _segments_of(part)
    return referenced


def _segments_of(part: Path) -> set[str]:
    """Every segment a part references (its stats and its rows; they agree unless the part is damaged)."""
    try:
        names = set(pq.read_table(part, columns=["segment"])["segment"].to_pylist())
        stats_segment = part_stats(part).get("segment")
    except FileNotFoundError:
        return set()  # set aside by a repairing extract since we listed it
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StoreError(f"{part} cannot be read ({type(e).__name__}: {e}): gc will not delete anything while "
                         "a commit record is unreadable; run `probecache store verify`") from e
    return names | ({stats_segment} if isinstance(stats_segment, str) else set())


def _segment_present(layout: StoreLayout, name: str) -> bool:
    return any(os.path.lexists(layout.segments / n) for n in (name, DELETING + name, LEGACY_DELETING + name))


def _delete_segment(layout: StoreLayout, folder: Path, alive) -> bool:
    """Rename out of the way, check again, then remove (or put back): readers and status never look at hidden
    names, and a writer that woke up (its lease fresh again) or a commit that landed keeps its segment."""
    if alive():
        return False
    hidden = layout.segments / (DELETING + folder.name)
    try:
        os.rename(folder, hidden)
    except FileNotFoundError:
        return False
    crash_point("gc-delete")  # fault tests kill here: the next gc must finish (or restore) the hidden folder
    if alive():
        _restore(hidden, folder)
        return False
    _rmtree(hidden)
    return True


def _restore(hidden: Path, folder: Path) -> bool:
    if os.path.lexists(folder):
        return False  # cannot happen for names gc made (attempt names are unique); never overwrite
    try:
        os.rename(hidden, folder)
    except FileNotFoundError:
        return False  # another gc restored or removed it
    return True


def _remove_companions(layout: StoreLayout, name: str, report: GcReport, dry_run: bool, age: float | None,
                       now: float) -> None:
    """The stats file and the (stale) lease of a removed segment."""
    for kind, path in (("stats", layout.stats / f"{name}.json"), ("lease", layout.path / LEASES / f"{name}.json")):
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        report.removed.append(Removal(kind, _rel(layout, path), st.st_size, None if age is None else round(age, 1)))
        if not dry_run:
            path.unlink(missing_ok=True)


def _legacy_part_temp(path: Path) -> bool:
    """An older version's commit temp file, recognised only when provably ours: named for a part, and holding a
    commit record of that very shard."""
    m = _LEGACY_PART_TEMP.fullmatch(path.name)
    if m is None:
        return False
    try:
        stats = part_stats(path)
    except Exception:  # not a Parquet part: not ours
        return False
    attempt = parse_segment(stats.get("segment"))
    return attempt is not None and attempt.shard_id == int(m.group(1)) == stats.get("shard_id")


def _remove_old_file(layout: StoreLayout, path: Path, kind: str, report: GcReport, dry_run: bool,
                     now: float, min_age: float = 0.0) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:  # a commit just linked and removed its temp file
        return
    age = now - st.st_mtime
    # a temp file still hard-linked to its part (killed after the link) frees nothing when unlinked
    item = Removal(kind, _rel(layout, path), st.st_size if st.st_nlink == 1 else 0, round(age, 1))
    if age < max(report.older_than_seconds, min_age):
        item.reason = "too young"
        report.kept.append(item)
        return
    report.removed.append(item)
    if not dry_run:
        path.unlink(missing_ok=True)


def _rmtree(path: Path) -> None:
    # a concurrent gc may be removing the same tree: tolerate entries vanishing, then insist it is gone.
    # rmtree never follows links inside the tree (it unlinks them), and ``path`` itself is a real folder
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        shutil.rmtree(path)


def tree_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (files vanishing meanwhile count 0; links count their own size)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _rel(layout: StoreLayout, path: Path) -> str:
    return path.relative_to(layout.path).as_posix()


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
