"""The commit of one shard: the only sequence that makes a segment visible to readers, on any root.

Both writers of shards end here: extraction (extract/shard.py, on the local store or its staging copy) and
copying a committed shard between roots (`store push` / `pull`, store/transfer.py). The caller has written every
file of the segment under ``segments/<segment>/`` and holds the segment's lease (store/lease.py); then:

    stats/<segment>.json      informational (`store status`), never trusted for correctness
    lease refresh             so a gc that just renamed the segment away sees it fresh and puts it back
    check                     every file of the commit record is at the root with its recorded size (one listing,
                              no bytes read; `verify` checks crc32c): a segment deleted or truncated underneath the
                              writer is never committed (the caller writes it again)
    manifests/part-<shard>    create-if-absent: exactly one attempt of a shard wins; a loser's segment is an
                              orphan for gc

The caller releases the lease afterwards, committed or not.
"""

from __future__ import annotations

from dataclasses import dataclass

from probecache.manifests.schema import part_file_name

from .faults import crash_point
from .lease import LeaseKeeper
from .roots import Root
from .verified import FileRecord


@dataclass(frozen=True)
class CommitOutcome:
    committed: bool  # this call created the part (False: another attempt had committed the shard, or damage)
    damage: str | None = None  # why nothing was committed: recorded files missing or of another size


def commit_shard(root: Root, shard_id: int, segment: str, files: FileRecord, part: bytes, stats: bytes | None,
                 leases: LeaseKeeper | None) -> CommitOutcome:
    """Commit shard ``shard_id`` as ``segment`` at ``root`` (see the module docstring); ``stats``: the JSON of
    ``stats/<segment>.json`` (None: none)."""
    stats_key = f"stats/{segment}.json"
    if stats is not None:
        root.put(stats_key, stats)
    crash_point("stats-written")
    if leases is not None:
        leases.refresh(segment)
    damage = segment_damage(root, segment, files)
    if damage is not None:
        if stats is not None:
            root.delete(stats_key)
        return CommitOutcome(False, damage)
    return CommitOutcome(root.put_if_absent(f"manifests/{part_file_name(shard_id)}", part))


def segment_damage(root: Root, segment: str, files: FileRecord) -> str | None:
    """What keeps ``segment`` at ``root`` from matching its commit record (missing or resized files), or None."""
    present = root.list(f"segments/{segment}")
    missing = [rel for rel in sorted(files) if rel not in present]
    resized = [rel for rel in sorted(files) if rel in present and present[rel].size != files[rel][0]]
    if not missing and not resized:
        return None
    what = [f"{len(missing)} files missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            if missing else "", f"{len(resized)} files changed size ({', '.join(resized[:3])})" if resized else ""]
    return f"segments/{segment}: " + "; ".join(w for w in what if w)
