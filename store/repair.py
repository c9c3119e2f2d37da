"""Repair by rerun: a commit record whose segment is missing or incomplete is set aside, and the shard is
extracted again.

A manifest part is the commit of its shard. If its segment is damaged afterwards (deleted by a gc that predates
leases, by a person, or restored without all its files), the shard stays "committed" with nothing behind it
and a rerun would say "already extracted" forever. So `extract` checks every committed part before it decides
what to run (cheap: the part itself, checked against its own digest, and one stat per recorded file; no array
bytes read) and renames a broken one to ``manifests/.probecache-broken-part-NNNNN-<time>-<8 hex>.parquet``:
readers only ever read ``part-NNNNN.parquet`` names, `store verify` notes the moved record, `store gc` removes
it once it is older than ``--older-than``, and this run extracts the shard again in a fresh attempt.

Broken means one of:
    the part cannot be read or fails its own checksum, or its commit stats do not name an attempt of its own
    shard (another shard's part copied over it, a hand edit)
    its segment folder is missing
    a file its commit recorded is missing or has another size
A crc32c mismatch in a segment file (a flipped bit) is not looked for here: finding one reads every byte;
`store verify` does.
Parts committed before file records existed (no ``files`` in their stats) are checked for their folder only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from probecache.manifests.schema import PART_NAME, ManifestError, committed_part_files, read_part

from .commit import fsync_dir
from .layout import StoreLayout, new_attempt_id
from .remote import DELETING, LEGACY_DELETING
from .scan import parse_segment

BROKEN_PREFIX = ".probecache-broken-part-"
BROKEN_NAME = re.compile(r"\.probecache-broken-part-(\d{5,})-(\d{8}T\d{6})-([0-9a-f]{8})\.parquet")  # fullmatch


@dataclass(frozen=True)
class BrokenPart:
    shard_id: int
    where: str  # manifests/part-00002.parquet (or its URL)
    reason: str
    moved_to: str  # where the record went


def broken_name(shard_id: int) -> str:
    return f"{BROKEN_PREFIX}{shard_id:05d}-{new_attempt_id()}.parquet"


def record_damage(shard_id: int, stats: dict, size_of: Callable[[str], int | None] | None) -> str | None:
    """What is wrong with a commit record and its segment, or None. ``stats`` is the part's commit stats;
    ``size_of(rel)`` the size of a file of its segment (None: missing); ``size_of`` None: no segment at all."""
    segment = stats.get("segment")
    attempt = parse_segment(segment)
    if attempt is None or attempt.shard_id != shard_id or stats.get("shard_id") != shard_id:
        return (f"records shard {stats.get('shard_id')!r} and segment {segment!r}, not a commit of shard "
                f"{shard_id}")
    if size_of is None:
        return f"its segment segments/{segment} is missing"
    files = stats.get("files")
    if not isinstance(files, dict):
        return None  # committed before file records existed: the folder is all there is to check
    missing, resized = [], []
    for rel, entry in sorted(files.items()):
        parts = PurePosixPath(rel).parts
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], int)
                or PurePosixPath(rel).is_absolute() or ".." in parts or not parts):
            return f"its record of file {rel!r} is malformed"
        size = size_of(rel)
        if size is None:
            missing.append(rel)
        elif size != entry[0]:
            resized.append(rel)
    if not missing and not resized:
        return None
    what = []
    if missing:
        what.append(f"{len(missing)} of its {len(files)} recorded files are missing ({_some(missing)})")
    if resized:
        what.append(f"{len(resized)} have another size than recorded ({_some(resized)})")
    return f"segment segments/{segment}: " + ", ".join(what)


def part_damage(layout: StoreLayout, shard_id: int, part: Path) -> str | None:
    """What is wrong with a local committed part and its segment (see the module docstring), or None."""
    try:
        _, stats = read_part(part)
    except ManifestError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None  # set aside by another extractor since we listed it
        return "it cannot be read or fails its own checksum"
    segment = stats.get("segment")
    folder = layout.segments / segment if parse_segment(segment) is not None else None
    if folder is not None and not folder.is_dir():
        return record_damage(shard_id, stats, None)

    def size_of(rel: str) -> int | None:
        try:
            return os.stat(folder / rel).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    return record_damage(shard_id, stats, size_of)


def restore_half_deleted(layout: StoreLayout, segment: str) -> bool:
    """Put back a committed segment that a gc renamed to ``.probecache-deleting-<segment>`` (or the older
    ``.deleting-``) and was killed before its second look: a part references it, so it was never gc's to delete."""
    if parse_segment(segment) is None or os.path.lexists(layout.segments / segment):
        return False
    for prefix in (DELETING, LEGACY_DELETING):
        hidden = layout.segments / (prefix + segment)
        if hidden.is_dir() and not hidden.is_symlink():
            try:
                os.rename(hidden, layout.segments / segment)
                return True
            except FileNotFoundError:
                continue  # another gc or extractor got there first
    return False


def set_aside_broken_parts(layout: StoreLayout) -> list[BrokenPart]:
    """Rename every broken committed part of a local store to a reserved name (see the module docstring)."""
    moved = []
    parts = {int(PART_NAME.match(p.name).group(1)): p for p in committed_part_files(layout.manifests)}
    for shard_id, part in sorted(parts.items()):
        reason = part_damage(layout, shard_id, part)
        if reason is not None and "is missing" in reason:
            segment = _segment_named(part)
            if segment is not None and restore_half_deleted(layout, segment):
                reason = part_damage(layout, shard_id, part)
        if reason is None:
            continue
        target = layout.manifests / broken_name(shard_id)
        try:
            os.rename(part, target)  # atomic: the name is free for the new commit at once
        except FileNotFoundError:
            continue  # another extractor set it aside first
        if part_damage(layout, shard_id, target) is None:
            # what we moved was healthy: another extractor had already set the broken record aside and committed
            # the shard again between our check and our rename. Put it back unless yet another commit exists.
            try:
                os.link(target, part)
                target.unlink()
            except FileExistsError:
                pass
            continue
        fsync_dir(layout.manifests)
        moved.append(BrokenPart(shard_id, f"{layout.manifests / part.name}", reason, f"manifests/{target.name}"))
    return moved


def _segment_named(part: Path) -> str | None:
    try:
        segment = read_part(part)[1].get("segment")
    except ManifestError:
        return None
    return segment if isinstance(segment, str) else None


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")
