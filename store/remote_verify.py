"""`store verify URL` and `store gc URL`: the local checks of verify.py and gc.py, on object storage.

verify: the header and manifests are synced into the mirror (remote_reader.py) and checked exactly as a local
store's (plan hash, every part against itself and the plan, duplicates across parts); then one LIST of
``segments/`` gives every object's size, so missing, truncated and unrecorded files are found without
reading them, and every recorded file is downloaded and its crc32c compared with the commit record (on
``workers`` threads; nothing is kept). Array shapes are read from the segments' zarr.json files.

gc: refuses, deleting nothing, a store whose store.json is not this store id's or that does not verify
structurally (``verify_remote(checksums=False)``: the checks above from the one LIST, no downloads). Then
orphan segments (no part references them: a commit race lost, an upload interrupted) are deleted object by
object when no fresh lease holds them (``leases/<segment>.json``, written by every upload before its first
object and refreshed while it runs: store/lease.py) and their newest object is older than the age gate; right
before the deletion the shard's part and the lease are read again. An upload checks its objects once more
before it commits (store/transfer.py), so even a lease that expired under a suspended uploader cannot make it
commit a segment gc deleted.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
from probecache.manifests.schema import PART_NAME, part_stats

from .errors import StoreError
from .gc import GcReport, Removal, check_gc_header, refuse_unverified
from .integrity import crc32c_hex
from .lease import LEASES, lease_key, lease_state
from .remote import ObjectRoot, clean_key, parse_url
from .remote_reader import FetchingStore, cache_limit, mirror_dir, segment_cache, sync_metadata
from .repair import BROKEN_NAME, record_damage
from .status import open_layout, parse_segment, part_files
from .transfer import read_stats
from .verified import CheckedFiles
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


def verify_remote(url: str, workers: int = 8, checksums: bool = True) -> VerifyReport:
    """Check a store on object storage; StoreError only when ``url`` is not a store. ``checksums=False``: no
    downloads and no array metadata reads, only the records against one LIST (what gc needs)."""
    return _verify(*_open(url), workers=workers, checksums=checksums)


def _verify(location, root: ObjectRoot, layout, info: dict, workers: int = 8, checksums: bool = True,
            objects: dict[str, dict[str, tuple[int, float]]] | None = None) -> VerifyReport:
    report = VerifyReport(location.url, shards_total=int(info["plan"]["n_shards"]))
    problem, note = report.problems.append, report.notes.append
    plan = _check_plan(layout, info, problem)
    _, listed = root.list_dir("manifests")
    broken = sorted(n for n in listed if BROKEN_NAME.fullmatch(n))
    strays = sorted(n for n in listed if not PART_NAME.match(n) and n not in broken)
    if strays:
        note(f"manifests/ holds objects that are not parts (ignored by readers): {_some(strays)}")
    if broken:
        note(f"{len(broken)} commit records were set aside by extract because their segment was missing or "
             f"incomplete ({_some(broken)}); their shards were extracted again; readers ignore them")
    objects = _segments_listing(root) if objects is None else objects
    repairable: list[int] = []
    cache = segment_cache(cache_limit())
    checked = CheckedFiles()  # the reader's cache of checked files (store/verified.py), here for shapes only
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
        if record_damage(shard, stats, (lambda rel, p=present: p[rel][0] if rel in p else None)
                         if present else None) is not None:
            repairable.append(shard)
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
            elif checksums:
                downloads.append((segment, rel, size, crc))
        for rel in sorted(set(present) - set(files)):
            problem(f"segments/{segment}/{rel}: file is not in the commit record of {where}")
        if checksums:
            fetching = FetchingStore(layout.segment(segment), files, root.child(f"segments/{segment}"), cache,
                                     checked, f"{location.url}/segments/{segment}")
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
             "`probecache store gc` removes old ones that no running upload holds")
    if repairable:
        note(f"{len(repairable)} committed shards ({_some([str(s) for s in repairable])}) point at a missing or "
             "incomplete segment: rerun the extract command with this --root: it moves those records aside to "
             "manifests/.probecache-broken-part-* and extracts the shards again")
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
    """Delete orphan segments (and their stats and stale leases) that no live lease holds and that are idle
    longer than ``older_than_seconds``; StoreError, deleting nothing, on a store that does not verify."""
    location, root, layout, info = _open(url)
    check_gc_header(info, location.name, location.url)
    objects = _segments_listing(root)
    refuse_unverified(_verify(location, root, layout, info, checksums=False, objects=objects).problems,
                      location.url)
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
    leases = root.list_dir(LEASES)[1]

    def lease_of(segment: str, fresh_listing: bool = False):
        name = f"{segment}.json"
        listed = root.list_dir(LEASES)[1] if fresh_listing else leases
        if name not in listed:
            return None
        data = root.get(lease_key(segment))
        return None if data is None else lease_state(data, listed[name].mtime, now)

    for segment, files in sorted(objects.items()):
        attempt = parse_segment(segment)
        if attempt is None or segment in referenced:
            continue  # not a name the writer makes (never ours to delete), or committed
        age = now - max(attempt.started, max(m for _, m in files.values()))
        item = Removal("segment", f"segments/{segment}", sum(s for s, _ in files.values()), round(age, 1))
        lease = lease_of(segment)
        if lease is not None and lease.fresh:
            item.reason = f"lease: {lease.why}"
            report.kept.append(item)
            continue
        if age < older_than_seconds:
            item.reason = "too young"
            report.kept.append(item)
            continue
        if not dry_run:
            part = root.get(f"manifests/part-{attempt.shard_id:05d}.parquet")  # committed since we listed?
            if part is not None and read_stats(part).get("segment") == segment:
                continue
            lease = lease_of(segment, fresh_listing=True)  # an upload (re)started since we listed?
            if lease is not None and lease.fresh:
                continue
            for rel in files:
                root.delete(f"segments/{segment}/{rel}")
            root.delete(f"stats/{segment}.json")
            root.delete(lease_key(segment))
        report.removed.append(item)
    # leases whose segment is gone (an upload killed before its first object, or after gc took the segment)
    for name, meta in sorted(leases.items()):
        segment = name.removesuffix(".json")
        if not name.endswith(".json") or parse_segment(segment) is None or segment in objects:
            continue
        lease = lease_of(segment)
        age = now - meta.mtime
        if (lease is not None and lease.fresh) or age < older_than_seconds:
            continue
        report.removed.append(Removal("lease", lease_key(segment), meta.size, round(age, 1)))
        if not dry_run:
            root.delete(lease_key(segment))
    return report
