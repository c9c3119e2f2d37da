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

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from probecache.manifests.schema import ManifestError, part_file_name, read_part

from .layout import new_attempt_id
from .roots import DELETING, LEGACY_DELETING, Root
from .scan import committed_parts, parse_segment

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


def set_aside_broken_parts(root: Root) -> list[BrokenPart]:
    """Move every broken committed part of the store at ``root`` (a local folder or an object-store prefix) to a
    reserved name (see the module docstring). One listing of segments/ gives every file's size."""
    parts = committed_parts(root)
    if not parts:
        return []
    sizes = _segment_sizes(root)
    moved = []
    for shard_id, name in sorted(parts.items()):
        key = f"manifests/{name}"
        judged = root.get(key)
        if judged is None:
            continue  # set aside by another extractor since we listed it
        reason, segment = _part_damage(shard_id, judged, sizes)
        half_deleted = reason is not None and segment is not None and "is missing" in reason
        if half_deleted and restore_half_deleted(root, segment):
            sizes = _segment_sizes(root)
            reason, _ = _part_damage(shard_id, judged, sizes)
        if reason is None:
            continue
        target = f"manifests/{broken_name(shard_id)}"
        if root.set_aside(key, target, judged):
            moved.append(BrokenPart(shard_id, f"{root.url}/{key}", reason, target))
    return moved


def _segment_sizes(root: Root) -> dict[str, dict[str, int]]:
    """segment -> {file: size} of every file under segments/ (hidden and in-flight names excluded)."""
    sizes: dict[str, dict[str, int]] = {}
    for key, meta in root.list("segments").items():
        segment, _, rel = key.partition("/")
        sizes.setdefault(segment, {})[rel] = meta.size
    return sizes


def _part_damage(shard_id: int, part: bytes, sizes: dict[str, dict[str, int]]) -> tuple[str | None, str | None]:
    """(what is wrong with a committed part and its segment or None, the segment it names)."""
    try:
        _, stats = read_part(part, f"manifests/{part_file_name(shard_id)}")
    except ManifestError:
        return "it cannot be read or fails its own checksum", None
    segment = stats.get("segment") if isinstance(stats.get("segment"), str) else None
    present = sizes.get(segment) if segment is not None and parse_segment(segment) is not None else {}
    return record_damage(shard_id, stats, present.get if present is not None else None), segment


def restore_half_deleted(root: Root, segment: str) -> bool:
    """Put back a committed segment that a gc renamed to ``.probecache-deleting-<segment>`` (or the older
    ``.deleting-``) and was killed before its second look: a part references it, so it was never gc's to delete.
    (Only local gc hides a tree before deleting it; on an object store there is nothing to restore.)"""
    if parse_segment(segment) is None:
        return False
    folders, _ = root.list_dir("segments", hidden=True)
    if segment in folders:
        return False
    links = set(root.links("segments"))
    for prefix in (DELETING, LEGACY_DELETING):
        hidden = prefix + segment
        if hidden in folders and hidden not in links and root.rename(f"segments/{hidden}", f"segments/{segment}"):
            return True
    return False


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")
