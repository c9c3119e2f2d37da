"""`gc`: remove what killed or losing attempts left behind, never anything a commit record references.

What goes, once older than the threshold:
    orphan segments   segments/shard-NNNNN-<attempt>/ that no manifest part references
    their stats       stats/<segment>.json (and stats files whose segment is already gone)
    temp files        .tmp-* in manifests/ (and the store root) from a commit killed before its link

There is no lock: the age gate is the safety. A running attempt writes into its segment at least once per
zarr shard, so its folder's newest mtime stays young; the age is measured from the later of the attempt's
start (in its name) and that mtime, and the part of its shard is read again right before a deletion.

A segment is deleted by renaming it to ``segments/.deleting-<name>`` first, then removing the tree: a crash
mid-delete leaves a hidden folder no reader ever references, and the next gc finishes it unconditionally.
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

from .errors import StoreError
from .faults import crash_point
from .layout import StoreLayout
from .status import format_duration, newest_mtime, open_layout, parse_segment, part_files, segment_attempts

DELETING = ".deleting-"
DEFAULT_OLDER_THAN = 6 * 3600.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
AGE_FORMS = "0, or a whole number with a unit: 30s, 15m, 6h, 2d"


@dataclass
class Removal:
    kind: str  # "segment" | "deleting" (finishing an interrupted gc) | "stats" | "temp"
    path: str  # relative to the store folder
    bytes: int
    age_seconds: float | None  # None for half-deleted segments (removed whatever their age)


@dataclass
class GcReport:
    path: str
    dry_run: bool
    older_than_seconds: float
    removed: list[Removal] = field(default_factory=list)  # or, with dry_run, what would be removed
    kept: list[Removal] = field(default_factory=list)  # unreferenced but too young: maybe still being written

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


def gc_store(path: str | Path, older_than_seconds: float = DEFAULT_OLDER_THAN, dry_run: bool = False,
             now: float | None = None) -> GcReport:
    """Remove (or with ``dry_run`` only list) unreferenced debris older than ``older_than_seconds``.

    StoreError when ``path`` is not a store, or when a part cannot be read: then what is referenced is
    unknown, and deleting anything could destroy committed data.
    """
    layout, _ = open_layout(path)
    now = time.time() if now is None else now
    report = GcReport(str(layout.path), dry_run, older_than_seconds)
    referenced = set()
    for part in part_files(layout).values():
        referenced |= _segments_of(part)
    handled: set[str] = set()  # segment names whose stats file was dealt with alongside the segment

    # 1. finish deletions an interrupted gc started: those folders were unreferenced and old when renamed
    if layout.segments.is_dir():
        for folder in sorted(layout.segments.glob(DELETING + "*")):
            name = folder.name.removeprefix(DELETING)
            report.removed.append(Removal("deleting", _rel(layout, folder), tree_bytes(folder), None))
            if not dry_run:
                _rmtree(folder)
            _remove_stats(layout, name, report, dry_run, None)
            handled.add(name)

    # 2. orphan segments: killed attempts, losers of a commit race, attempts of shards not yet committed
    for name, attempt in sorted(segment_attempts(layout).items()):
        if name in referenced:
            continue
        folder = layout.segments / name
        age = now - max(attempt.started, newest_mtime(folder))
        item = Removal("segment", _rel(layout, folder), tree_bytes(folder), round(age, 1))
        if age < older_than_seconds:
            report.kept.append(item)
            continue
        if not dry_run:
            # a worker may have committed this very attempt since we listed the parts: read its part again
            part = layout.part(attempt.shard_id)
            if part.exists() and name in _segments_of(part):
                continue
            if not _delete_segment(layout, folder):
                continue  # another gc got there first
        report.removed.append(item)
        _remove_stats(layout, name, report, dry_run, age)
        handled.add(name)

    # 3. stats files whose segment is gone (a crash between removing a segment and its stats)
    if layout.stats.is_dir():
        for stats in sorted(layout.stats.glob("shard-*.json")):
            name = stats.stem
            if name in handled or name in referenced or parse_segment(name) is None:
                continue
            if (layout.segments / name).exists():
                continue  # an orphan too young to remove keeps its stats
            _remove_old_file(layout, stats, "stats", report, dry_run, now)

    # 4. temp files of commits killed between writing the temp file and linking it
    for folder in (layout.manifests, layout.path):
        if folder.is_dir():
            for temp in sorted(folder.glob(".tmp-*")):
                _remove_old_file(layout, temp, "temp", report, dry_run, now)
    return report


def _segments_of(part: Path) -> set[str]:
    """Every segment a part references (its stats and its rows; they agree unless the part is damaged)."""
    try:
        names = set(pq.read_table(part, columns=["segment"])["segment"].to_pylist())
        stats_segment = part_stats(part).get("segment")
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StoreError(f"{part} cannot be read ({type(e).__name__}: {e}): gc will not delete anything while "
                         "a commit record is unreadable; run `probecache store verify`") from e
    return names | ({stats_segment} if isinstance(stats_segment, str) else set())


def _delete_segment(layout: StoreLayout, folder: Path) -> bool:
    """Rename out of the way, then remove: readers and status never look at hidden names."""
    hidden = layout.segments / (DELETING + folder.name)
    try:
        folder.rename(hidden)
    except FileNotFoundError:
        return False
    crash_point("gc-delete")  # fault tests kill here: the next gc must finish the hidden folder
    _rmtree(hidden)
    return True


def _remove_stats(layout: StoreLayout, name: str, report: GcReport, dry_run: bool, age: float | None) -> None:
    stats = layout.stats / f"{name}.json"
    if not stats.is_file():
        return
    report.removed.append(Removal("stats", _rel(layout, stats), stats.stat().st_size,
                                  None if age is None else round(age, 1)))
    if not dry_run:
        stats.unlink(missing_ok=True)


def _remove_old_file(layout: StoreLayout, path: Path, kind: str, report: GcReport, dry_run: bool,
                     now: float) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:  # a commit just linked and removed its temp file
        return
    age = now - st.st_mtime
    # a temp file still hard-linked to its part (killed after the link) frees nothing when unlinked
    item = Removal(kind, _rel(layout, path), st.st_size if st.st_nlink == 1 else 0, round(age, 1))
    if age < report.older_than_seconds:
        report.kept.append(item)
        return
    report.removed.append(item)
    if not dry_run:
        path.unlink(missing_ok=True)


def _rmtree(path: Path) -> None:
    # a concurrent gc may be removing the same tree: tolerate entries vanishing, then insist it is gone
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        shutil.rmtree(path)


def tree_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (files vanishing meanwhile count 0)."""
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
    if report.kept:
        shown = ", ".join(r.path for r in report.kept[:5]) + (" ..." if len(report.kept) > 5 else "")
        lines.append(f"kept {len(report.kept)} unreferenced item(s) younger than "
                     f"{format_duration(report.older_than_seconds)} (maybe still being written): {shown}")
    return lines
