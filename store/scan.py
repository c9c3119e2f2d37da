"""What a store's layout means, on any root (store/remote.py ``Root``: a local folder, s3://, gs://, memory://).

verify, gc, status, the reader and transfer all read a store through these helpers, so they agree on which
names are commits, which are attempts and which are debris, whatever kind of root holds the store:

    store.json                               the header (store/header.py), read and checked on every open
    manifests/part-NNNNN.parquet             the commit record of shard N (exactly the writer's name)
    segments/shard-NNNNN-<time>-<8 hex>/     one attempt of shard N (the writer's exact pattern)
    segments/.probecache-deleting-<segment>  a segment a local gc renamed away before removing it
"""

from __future__ import annotations

import calendar
import os
import re
import time
from dataclasses import dataclass

from probecache.manifests.schema import PART_NAME

from .errors import StoreError
from .header import parse_header
from .roots import DELETING, LEGACY_DELETING, ObjectInfo, Root, open_root

# shard-00042-20250101T120000-0123abcd, exactly what the writer names an attempt (layout.segment_name): the
# shard number is zero-padded to 5 digits but may grow beyond. Matched whole (fullmatch: `$` would accept a
# trailing newline), so gc and verify never take a user's folder for one of ours.
_SEGMENT = re.compile(r"shard-(\d{5,})-(\d{8}T\d{6})-([0-9a-f]{8})")


@dataclass(frozen=True)
class Attempt:
    """One attempt of one shard, named by its segment (the folder may not exist if it failed early)."""

    name: str
    shard_id: int
    started: float  # UTC start time from the name (second resolution)


def parse_segment(name: object) -> Attempt | None:
    """The attempt a segment name encodes, or None for a name that is not a segment of ours."""
    m = _SEGMENT.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        return None
    try:
        started = calendar.timegm(time.strptime(m.group(2), "%Y%m%dT%H%M%S"))
    except ValueError:  # 20251399T... has the shape but is no time the writer wrote
        return None
    return Attempt(name, int(m.group(1)), float(started))


def deleting_target(name: str) -> str | None:
    """The segment a half-deleted folder held, for names gc itself made (new or older prefix + exact pattern)."""
    for prefix in (DELETING, LEGACY_DELETING):
        if name.startswith(prefix) and parse_segment(name[len(prefix):]) is not None:
            return name[len(prefix):]
    return None


def open_store_root(store: str | os.PathLike | Root) -> tuple[Root, dict]:
    """The root of one store (a folder, a file:// or object-store URL, or a Root) and its checked header;
    StoreError when it is not a store."""
    root = store if isinstance(store, Root) else open_root(store)
    raw = root.get("store.json")
    if raw is None:
        raise StoreError(f"{root.url} is not a probecache store (no store.json): pass <root>/<store_id> "
                         "(`probecache store ls ROOT` lists them)")
    return root, parse_header(raw, f"{root.url}/store.json")


def committed_parts(root: Root) -> dict[int, str]:
    """shard id -> part name, for the names the writer produces (temp files and stray copies are not commits)."""
    _, files = root.list_dir("manifests")
    return {int(m.group(1)): name for name in sorted(files) if (m := PART_NAME.match(name))}


def segment_attempts(root: Root) -> dict[str, Attempt]:
    """Every segment folder that parses as an attempt: never a symbolic link (the writer never makes one, and gc
    must never follow one), never a hidden name (``.probecache-deleting-*``)."""
    folders, _ = root.list_dir("segments")
    links = set(root.links("segments"))
    return {n: a for n in folders if n not in links and (a := parse_segment(n)) is not None}


def segment_objects(root: Root) -> dict[str, dict[str, ObjectInfo]]:
    """segment folder name -> {file path within it: info}, from one recursive listing of segments/ (links and
    hidden folders are not walked)."""
    out: dict[str, dict[str, ObjectInfo]] = {}
    for key, meta in root.list("segments").items():
        segment, _, rel = key.partition("/")
        if rel:
            out.setdefault(segment, {})[rel] = meta
    return out

