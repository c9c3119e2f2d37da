"""`store verify URL` and `store gc URL`: the local checks of verify.py and gc.py, on object storage.

verify: the header and manifests are synced into the mirror (remote_reader.py) and checked exactly as a local
store's (plan hash, every part against itself and the plan, duplicates across parts); then one LIST of
``segments/`` gives every object's size, so missing, truncated and unrecorded files are found without
reading them, and every recorded file is downloaded and its crc32c compared with the commit record (on
``workers`` threads; nothing is kept). Array shapes are read from the segments' zarr.json files.

gc: orphan segments (no part references them: a commit race lost, an upload interrupted) whose newest object
is older than the age gate are deleted object by object, after the shard's part is read again; the
protection against deleting a live upload is the same age gate as local gc (uploads write continuously).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
from probecache.manifests.schema import PART_NAME, part_stats

from .errors import StoreError
from .gc import GcReport, Removal
from .integrity import crc32c_hex
from .remote import ObjectRoot, clean_key, parse_url
from .remote_reader import FetchingStore, cache_limit, mirror_dir, segment_cache, sync_metadata
from .status import open_layout, parse_segment, part_files
from .transfer import read_stats
from .verify import VerifyReport, _check_plan, _check_shapes, _some, note_example_ids, read_part_record


def _open(url: str):
    location = parse_url(url)
    root = ObjectRoot(location)
    mirror = mirror_dir(location.url)
    sync_metadata(root, mirror)
    layout, info = open_layout(mirror)
    return location, root, layout, info


def _segments_listing(root: ObjectRoot) -> dict[str, dict[str, tuple[int, float]]]:
    """segment name -> {file: (size, mtime)} from one recursive LIST of segments/."""
    out: dict[str, dict[str, tuple[int, float]]] = {}
    for key, meta in root.list("segments").items():
        segment, _, rel = key.partition("/")
        out.setdefault(segment, {})[rel] = (meta.size, meta.mtime)
    return out


def verify_remote(url: str, workers: int = 8) -> VerifyReport:
    """Check a store on object storage; StoreError only when ``url`` is not a store."""
    location, root, layout, info = _open(url)
    report = VerifyReport(location.url, shards_total=int(info["plan"]["n_shards"]))
    problem, note = report.problems.append, report.notes.append
    plan = _check_plan(layout, info, problem)
    _, listed = root.list_dir("manifests")
    strays = sorted(n for n in listed if not PART_NAME.match(n))
    if strays:
        note(f"manifests/ holds objects that are not parts (ignored by readers): {_some(strays)}")
    objects = _segments_listing(root)
    cache = segment_cache(cache_limit())
    first_seen: dict[str, str] = {}
    duplicates: list[str] = []
    referenced: set[str] = set()
    downloads: list[tuple[str, str, int, str]] = []
    examples = 0
    parts = part_files(layout)
    for shard, part in parts.items():
        where = f"manifests/{part.name}"
        record = read_part_record(part, shard, plan, problem)
        if record is None:
            continue
        table, stats, segment, ids, named_ok = record
        referenced.add(segment)
        report.parts_checked += 1
        examples += len(ids)
        note_example_ids(ids, part.name, first_seen, duplicates)
        if not named_ok:
            continue
        present = objects.get(segment)
        if not present:
            problem(f"{where}: its segment segments/{segment} is missing")
            continue
        files = _recorded_files(stats, where, problem)
        if files is None:
            continue
        for rel, (size, crc) in files.items():
            label = f"segments/{segment}/{rel}"
            if rel not in present:
                problem(f"{label}: recorded file is missing")
            elif present[rel][0] != size:
                problem(f"{label}: {present[rel][0]} bytes, {size} recorded (truncated or rewritten)")
            else:
                downloads.append((segment, rel, size, crc))
        for rel in sorted(set(present) - set(files)):
            problem(f"segments/{segment}/{rel}: file is not in the commit record of {where}")
        fetching = FetchingStore(layout.segment(segment), files, root.child(f"segments/{segment}"), cache)
        _check_shapes(fetching, info, where, len(ids), sum(table["n_tokens"].to_pylist()), problem)
    if duplicates:
        problem(f"{len(duplicates)} example ids are committed twice: {_some(duplicates)}")

    def check(job: tuple[str, str, int, str]) -> tuple[str | None, int]:
        segment, rel, size, crc = job
        data = root.get(f"segments/{segment}/{rel}")
        label = f"segments/{segment}/{rel}"
        if data is None:
            return f"{label}: recorded file is missing", 0
        if len(data) != size:
            return f"{label}: {len(data)} bytes, {size} recorded (truncated or rewritten)", 0
        actual = crc32c_hex(data)
        return (None if actual == crc else f"{label}: crc32c {actual}, {crc} recorded (corrupted)"), size

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for found, size in pool.map(check, downloads):
            report.files_checked += 1
            report.bytes_checked += size
            if found:
                problem(found)

    n_shards, n_examples = int(info["plan"]["n_shards"]), int(info["plan"].get("n_examples", -1))
    if set(parts) >= set(range(n_shards)):
        if examples != n_examples and report.parts_checked == len(parts):
            problem(f"complete store holds {examples} examples, plan says {n_examples}")
    else:
        note(f"incomplete: {len(set(parts) & set(range(n_shards)))} of {n_shards} shards committed "
             "(not an error; rerun the extract command to finish)")
    orphans = sorted(s for s in objects if s not in referenced and parse_segment(s) is not None)
    if orphans:
        note(f"{len(orphans)} orphan segments no part references ({_some(orphans)}); readers never see them, "
             "`probecache store gc` removes old ones")
    return report


def _recorded_files(stats: dict, where: str, problem) -> dict[str, tuple[int, str]] | None:
    files = stats.get("files")
    if not isinstance(files, dict) or not files:
        problem(f"{where}: records no segment files (committed before checksums were recorded?)")
        return None
    out = {}
    for rel, entry in files.items():
        try:
            clean_key(rel)
            out[rel] = (int(entry[0]), str(entry[1]))
        except (StoreError, TypeError, ValueError, IndexError):
            problem(f"{where}: malformed file record {rel!r}: {entry!r}")
    return out


def gc_remote(url: str, older_than_seconds: float, dry_run: bool = False, now: float | None = None) -> GcReport:
    """Delete orphan segments (and their stats objects) idle longer than ``older_than_seconds``."""
    location, root, layout, _ = _open(url)
    now = time.time() if now is None else now
    report = GcReport(location.url, dry_run, older_than_seconds)
    referenced = set()
    for part in part_files(layout).values():
        try:
            referenced |= set(pq.read_table(part, columns=["segment"])["segment"].to_pylist())
            referenced.add(part_stats(part).get("segment"))
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise StoreError(f"{location.url}/manifests/{part.name} cannot be read ({type(e).__name__}): gc will "
                             "not delete anything while a commit record is unreadable") from e
    for segment, files in sorted(_segments_listing(root).items()):
        attempt = parse_segment(segment)
        if attempt is None or segment in referenced:
            continue
        age = now - max(attempt.started, max(m for _, m in files.values()))
        item = Removal("segment", f"segments/{segment}", sum(s for s, _ in files.values()), round(age, 1))
        if age < older_than_seconds:
            report.kept.append(item)
            continue
        if not dry_run:
            part = root.get(f"manifests/part-{attempt.shard_id:05d}.parquet")  # committed since we listed?
            if part is not None and read_stats(part).get("segment") == segment:
                continue
            for rel in files:
                root.delete(f"segments/{segment}/{rel}")
            root.delete(f"stats/{segment}.json")
        report.removed.append(item)
    return report

