"""`verify`: prove every committed shard is exactly what its commit recorded and what the plan asked for, on any
root (a local folder, s3://, gs://, memory://: one algorithm over store/remote.py's ``Root``).

Trust flows from the commit records only: each manifest part carries {file: [size, crc32c]} for every file
of its segment at commit time, so a flipped bit, a truncated chunk or a deleted file is caught without
trusting anything else in the segment folder. On top of the bytes, the part's rows must describe the
segment's arrays exactly (shapes, offsets tiling the token axis, rows 0..N-1) and the plan's examples for
that shard (ids and token counts), and plan.parquet must still hash to what store.json recorded.

One listing of ``segments/`` gives every file's size, so missing, truncated and unrecorded files are found
without reading them; then every recorded file is checksummed (``workers`` threads: a local file is streamed,
an object downloaded and dropped) and the arrays' shapes are read from their ``zarr.json``.

Leftovers of the commit protocol (``.probecache-tmp-*`` files of a killed write, orphan segments of killed or
losing attempts, stale leases, ``.probecache-deleting-*`` folders of an interrupted gc, commit records a
repairing extract set aside) are expected and reported as notes, not problems. A missing manifests/ folder is a
problem on a local disk: every commit record is gone, and the segments would all look like orphans to gc.

``checksums=False`` is the structural check `store gc` runs before deleting anything: everything above except
reading segment bytes (a recorded file must still be listed with its recorded size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from probecache.manifests.schema import DIGEST_KEY, PART_NAME, ManifestError, read_part

from .commit import TEMP_NAME
from .errors import StoreError
from .header import SEAL, label_name_mismatch, stored_layers
from .integrity import plan_digest
from .lease import LEASES
from .prefixes import example_ranges
from .remote import clean_key
from .repair import BROKEN_NAME, record_damage
from .roots import ObjectInfo, Root
from .scan import deleting_target, open_store_root, parse_segment, segment_attempts, segment_objects
from .token_policy import store_token_policy

_PART_COLUMNS = ("example_id", "shard_id", "segment", "token_offset", "n_tokens", "row")
_SHOW = 5  # ids named per problem; the rest are counted


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parts_checked: int = 0
    shards_total: int = 0
    files_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class _Record:
    """One committed part, checked against itself and the plan."""

    shard: int
    name: str
    segment: str
    ids: list[str]
    n_tokens: int  # on hidden's token axis (fewer than the examples' with --share-prefixes)
    files: dict[str, tuple[int, str]] | None  # None: unusable (malformed or absent), already reported


def verify_store(store: str | os.PathLike | Root, workers: int = 8, checksums: bool = True) -> VerifyReport:
    """Check a store; StoreError only when ``store`` is not one. ``checksums=False`` checks recorded files by
    their listed size only and reads no segment bytes (what gc needs, see above)."""
    root, info = open_store_root(store)
    report = VerifyReport(root.url, shards_total=int(info["plan"]["n_shards"]))
    problem, note = report.problems.append, report.notes.append
    plan = _check_plan(root, info, problem)
    top_folders, _ = root.list_dir("", hidden=True)
    _, manifests = root.list_dir("manifests", hidden=True)
    objects = segment_objects(root)
    if root.keeps_empty_folders and "manifests" not in top_folders:
        _, stats = root.list_dir("stats")
        if objects or stats:
            problem(f"manifests/ is missing while segments/ holds {len(objects)} segments and stats/ {len(stats)} "
                    "files: the commit records are gone and readers see no examples; restore manifests/ from a copy "
                    "of the store, or rerun the extract command to extract every shard again (gc deletes nothing "
                    "until then)")
    parts = {int(m.group(1)): name for name in sorted(manifests) if (m := PART_NAME.match(name))}

    records, repairable, unsealed = [], [], []
    for shard, name in parts.items():
        data = root.get(f"manifests/{name}")
        if data is None:
            continue  # set aside by a repairing extract since we listed it
        if DIGEST_KEY not in (_footer(data) or {DIGEST_KEY: b""}):
            unsealed.append(name)
        record, damaged = _check_part(root, info, shard, name, data, plan, objects, problem)
        if damaged:
            repairable.append(shard)
        if record is not None:
            records.append(record)
    report.parts_checked = len(records)

    first_seen: dict[str, str] = {}  # example id -> the part that holds it first
    duplicates = [f"{eid} ({first_seen[eid]} and {r.name})" for r in records for eid in r.ids
                  if first_seen.setdefault(eid, r.name) != r.name]
    if duplicates:
        problem(f"{len(duplicates)} example ids are committed twice: {_some(duplicates)}")

    # the expensive part, on ``workers`` threads: every recorded byte read back and checksummed, the array shapes
    jobs = [(r.segment, rel, size, crc) for r in records if r.files for rel, (size, crc) in r.files.items()
            if objects[r.segment].get(rel, ObjectInfo(-1, 0)).size == size] if checksums else []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for found, size in pool.map(lambda job: _check_file(root, *job), jobs):
            report.bytes_checked += size
            if found:
                problem(found)
        if checksums:
            for found in pool.map(lambda r: _shape_problems(root, info, r), [r for r in records if r.files]):
                report.problems += found
    report.files_checked = sum(len(r.files or {}) for r in records)

    n_shards, n_examples = int(info["plan"]["n_shards"]), int(info["plan"].get("n_examples", -1))
    examples = sum(len(r.ids) for r in records)
    if set(parts) >= set(range(n_shards)):
        if examples != n_examples and report.parts_checked == len(parts):
            problem(f"complete store holds {examples} examples, plan says {n_examples}")
    else:
        note(f"incomplete: {len(set(parts) & set(range(n_shards)))} of {n_shards} shards committed "
             "(not an error; rerun the extract command to finish)")
    if SEAL not in info:
        note("store.json carries no checksum (written before probecache sealed headers): readers cross-check its "
             "fields against the arrays, but a hand edit of other fields goes unnoticed")
    if unsealed:
        note(f"{len(unsealed)} parts carry no content digest (written before digests existed): {_some(unsealed)}")
    _leftovers(root, manifests, {r.segment for r in records}, note)
    if repairable:
        note(f"{len(repairable)} committed shards ({_some([str(s) for s in repairable])}) have a missing, incomplete "
             "or damaged commit record or segment: rerun the extract command (with this --root): it moves those "
             "records aside to manifests/.probecache-broken-part-* and extracts the shards again")
    return report


def _footer(data: bytes) -> dict | None:
    try:
        return pq.read_schema(pa.BufferReader(data)).metadata or {}
    except Exception:  # an unreadable part is reported as a problem by _check_part
        return None


def _check_plan(root: Root, info: dict, problem: Callable[[str], None]) -> dict[int, dict[str, int]] | None:
    """plan.parquet against store.json; returns shard -> {example id: n_tokens}, or None if unreadable."""
    data = root.get("plan.parquet")
    if data is None:
        problem("plan.parquet is missing: parts cannot be checked against the plan")
        return None
    try:
        table = pq.read_table(pa.BufferReader(data))
        digest = plan_digest(table)
        ids, shards, tokens = (table[c].to_pylist() for c in ("example_id", "shard_id", "n_tokens"))
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
        problem(f"plan.parquet is unreadable ({type(e).__name__}: {e})")
        return None
    summary = info["plan"]
    if digest != summary.get("sha256"):
        problem(f"plan.parquet content hash {digest[:16]}... differs from store.json plan.sha256 "
                f"{str(summary.get('sha256'))[:16]}... (the plan was replaced or edited)")
    if len(ids) != summary.get("n_examples"):
        problem(f"plan.parquet has {len(ids)} examples, store.json says {summary.get('n_examples')}")
    if sum(tokens) != summary.get("n_tokens", sum(tokens)):
        problem(f"plan.parquet has {sum(tokens)} tokens, store.json says {summary.get('n_tokens')}")
    if ids and max(shards) + 1 != summary["n_shards"]:
        problem(f"plan.parquet has {max(shards) + 1} shards, store.json says {summary['n_shards']}")
    if len(set(ids)) != len(ids):
        problem(f"plan.parquet lists {len(ids) - len(set(ids))} example ids more than once")
    by_shard: dict[int, dict[str, int]] = {}
    policy = store_token_policy(info)  # the plan counts prompt tokens; a part counts the kept ones (--tokens)
    for eid, shard, n in zip(ids, shards, tokens, strict=True):
        by_shard.setdefault(shard, {})[eid] = policy.count(n)
    return by_shard


def _check_part(root: Root, info: dict, shard: int, name: str, data: bytes, plan: dict[int, dict[str, int]] | None,
                objects: dict[str, dict[str, ObjectInfo]], problem: Callable[[str], None]
                ) -> tuple[_Record | None, bool]:
    """One commit record against itself, the plan and the listing of its segment: (the record, or None when the
    part is too damaged to say which examples it holds; whether rerunning extract would set it aside)."""
    where = f"manifests/{name}"
    try:
        table, stats = read_part(data, where)
    except ManifestError as e:
        problem(str(e))
        return None, True
    checked = _check_part_record(where, shard, table, stats, plan, problem)
    if checked is None:
        return None, False
    segment, ids, named_ok = checked
    record = _Record(shard, name, segment, ids, sum(_own_tokens(table)), None)
    if "label_name" in table.column_names:
        wrong = label_name_mismatch(info["dataset"]["label_names"], table["label"].to_pylist(),
                                    table["label_name"].to_pylist())
        if wrong:
            problem(f"{where}: label {wrong[0]} is {wrong[1]!r} here, store.json's label_names say "
                    f"{info['dataset']['label_names']} (store.json edited?)")
    if not named_ok:
        return record, True  # never touch a path built from a name we did not write
    if segment not in objects:  # a segment behind a link (local), or a listing that lagged: list it on its own
        objects[segment] = root.list(f"segments/{segment}")
    present = objects[segment]
    damaged = record_damage(shard, stats, (lambda rel: present[rel].size if rel in present else None)
                            if present else None) is not None
    if not present:
        problem(f"{where}: its segment folder segments/{segment} is missing")
        return record, damaged
    record.files = _recorded_files(stats, where, problem)
    for rel, (size, _) in (record.files or {}).items():
        label = f"segments/{segment}/{rel}"
        if rel not in present:
            problem(f"{label}: recorded file is missing")
        elif present[rel].size != size:
            problem(f"{label}: {present[rel].size} bytes, {size} recorded (truncated or rewritten)")
    if record.files is not None:
        # a file nobody recorded may be read as data (a stray chunk key) or hide a partial overwrite
        for rel in sorted(set(present) - set(record.files)):
            problem(f"segments/{segment}/{rel}: file is not in the commit record of {where}")
    return record, damaged


def _recorded_files(stats: dict, where: str, problem: Callable[[str], None]) -> dict[str, tuple[int, str]] | None:
    files = stats.get("files")
    if not isinstance(files, dict) or not files:
        problem(f"{where}: records no segment files (committed before checksums were recorded?)")
        return None
    out = {}
    for rel, entry in files.items():
        try:
            if not isinstance(entry, list) or len(entry) != 2:
                raise ValueError
            out[clean_key(rel)] = (int(entry[0]), str(entry[1]))
        except (StoreError, TypeError, ValueError):
            problem(f"{where}: malformed file record {rel!r}: {entry!r}")
    return out


def _check_part_record(where: str, shard: int, table, stats: dict, plan: dict[int, dict[str, int]] | None,
                       problem: Callable[[str], None]) -> tuple[str, list[str], bool] | None:
    """(segment, example ids, whether the segment name is one of ours), or None when too damaged to say."""
    missing = [c for c in _PART_COLUMNS if c not in table.column_names]
    if missing:
        problem(f"{where}: columns {missing} are missing")
        return None
    ids, shard_ids, segments, offsets, n_tokens, rows = (table[c].to_pylist() for c in _PART_COLUMNS)
    segment = stats.get("segment")
    if not stats or not isinstance(segment, str):
        problem(f"{where}: no commit stats (probecache.shard_stats) naming its segment")
        return None

    if stats.get("shard_id") != shard or set(shard_ids) - {shard}:
        problem(f"{where}: records shard {stats.get('shard_id')} / rows of shards {sorted(set(shard_ids))}, "
                f"its name says shard {shard}")
    if set(segments) - {segment}:
        problem(f"{where}: rows name segments {sorted(set(segments) - {segment})}, its stats name {segment}")
    n, total = len(ids), sum(n_tokens)
    if stats.get("n_examples") != n or stats.get("n_tokens") != total:
        problem(f"{where}: {n} rows / {total} tokens, its stats say {stats.get('n_examples')} / "
                f"{stats.get('n_tokens')}")
    if sorted(rows) != list(range(n)):
        problem(f"{where}: rows are not 0..{n - 1}")
    own = _own_tokens(table)
    stored = stats.get("stored_tokens", total)
    if sum(own) != stored:
        problem(f"{where}: rows store {sum(own)} tokens of their own, its stats say {stored}")
    _check_tiling(where, offsets, own, ids, sum(own), problem)
    if "prefix_tokens" in table.column_names:
        _check_prefixes(where, table, problem)
    if len(set(ids)) != n:
        problem(f"{where}: {n - len(set(ids))} example ids appear twice in the part")
    _check_against_plan(where, shard, dict(zip(ids, n_tokens, strict=True)), plan, problem)

    attempt = parse_segment(segment)
    if attempt is None or attempt.shard_id != shard:
        problem(f"{where}: segment name {segment!r} is not an attempt of shard {shard}")
        return segment, ids, False
    return segment, ids, True


def _check_tiling(where: str, offsets: list[int], n_tokens: list[int], ids: list[str], total: int,
                  problem: Callable[[str], None]) -> None:
    """Examples must tile [0, T) of the token axis: sorted by offset, each starts where the last ended."""
    end = 0
    for offset, n, eid in sorted(zip(offsets, n_tokens, ids, strict=True)):
        if n <= 0:
            problem(f"{where}: example {eid} has {n} tokens")
            return
        if offset != end:
            kind = "gap" if offset > end else "overlap"
            problem(f"{where}: token offsets do not tile [0, {total}): {kind} at {end} (example {eid} "
                    f"starts at {offset})")
            return
        end = offset + n


def _own_tokens(table) -> list[int]:
    """Each row's tokens on hidden's token axis: n_tokens, less a shared prefix (--share-prefixes)."""
    n_tokens = table["n_tokens"].to_pylist()
    if "prefix_tokens" not in table.column_names:
        return n_tokens
    return [n - (s or 0) for n, s in zip(n_tokens, table["prefix_tokens"].to_pylist(), strict=True)]


def _check_prefixes(where: str, table, problem: Callable[[str], None]) -> None:
    """--share-prefixes: each shared prefix lies inside an example of the part that shares nothing (store/prefixes.py),
    and leaves its example at least one token of its own."""
    cols = [table[c].to_pylist() for c in ("example_id", "token_offset", "n_tokens", "prefix_offset", "prefix_tokens")]
    full = [(off, off + n) for _, off, n, _, s in zip(*cols, strict=True) if not s]
    bad = []
    for eid, offset, n, prefix_offset, s in zip(*cols, strict=True):
        if not s:
            continue
        start, stop = example_ranges(offset, n, prefix_offset or 0, s)[0]
        if not 0 < s < n or not any(lo <= start and stop <= hi for lo, hi in full):
            bad.append(f"{eid} ({s} of {n} tokens at {prefix_offset})")
    if bad:
        problem(f"{where}: {len(bad)} shared prefixes are not inside an example stored in full: {_some(bad)}")


def _check_against_plan(where: str, shard: int, got: dict[str, int], plan: dict[int, dict[str, int]] | None,
                        problem: Callable[[str], None]) -> None:
    if plan is None:
        return
    expected = plan.get(shard)
    if expected is None:
        problem(f"{where}: shard {shard} is not in the plan (shards 0..{max(plan, default=-1)})")
        return
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    wrong = sorted(f"{e} ({got[e]} tokens, plan {expected[e]})" for e in expected.keys() & got.keys()
                   if got[e] != expected[e])
    for items, what in ((missing, "planned examples are missing"), (extra, "examples are not planned for this shard"),
                        (wrong, "examples have other token counts than planned")):
        if items:
            problem(f"{where}: {len(items)} {what}: {_some(items)}")


def _check_file(root: Root, segment: str, rel: str, size: int, crc: str) -> tuple[str | None, int]:
    """(problem or None, bytes read) for one recorded file whose listed size matched its record."""
    label = f"segments/{segment}/{rel}"
    found = root.checksum(f"segments/{segment}/{rel}")
    if found is None:
        return f"{label}: recorded file is missing", 0
    if found[0] != size:
        return f"{label}: {found[0]} bytes, {size} recorded (truncated or rewritten)", 0
    if found[1] != crc:
        return f"{label}: crc32c {found[1]}, {crc} recorded (corrupted)", size
    return None, size


def _shape_problems(root: Root, info: dict, record: _Record) -> list[str]:
    """The arrays' zarr metadata against the rows: hidden (L', T, d), mean/last (N, L', d), logits (N, V)."""
    where, n = f"manifests/{record.name}", len(record.ids)
    layers, d = len(stored_layers(info)), info["model"]["hidden_size"]  # the layers kept (--layers)
    expected = {
        "hidden": (layers, max(record.n_tokens, 1), d),  # the writer never creates a zero-length array
        "mean": (n, layers, d),
        "last": (n, layers, d),
    }
    if info.get("capture", {}).get("logits"):
        expected["logits"] = (n, info["model"].get("vocab_size"))
    if info.get("capture", {}).get("token_ids"):
        expected["token_ids"] = (max(record.n_tokens, 1),)  # aligned with hidden's token axis
    found = []
    for name, shape in expected.items():
        if f"{name}/zarr.json" not in (record.files or {}):
            found.append(f"{where}: segment has no {name!r} array")
            continue
        try:
            meta = json.loads(root.get(f"segments/{record.segment}/{name}/zarr.json") or b"null")
            actual = tuple(meta["shape"])
        except Exception as e:  # damaged metadata: the checksums say which file
            found.append(f"{where}: segment array {name} cannot be opened ({type(e).__name__}: {e})")
            continue
        if actual != shape:
            found.append(f"{where}: {name} has shape {actual}, rows and store.json imply {shape}")
    return found


def _leftovers(root: Root, manifests: dict[str, ObjectInfo], referenced: set[str],
               note: Callable[[str], None]) -> None:
    """Expected debris of the commit protocol: reported so `gc` can be run, never an error."""
    _, top = root.list_dir("", hidden=True)
    _, leases = root.list_dir(LEASES, hidden=True)
    temps = sorted(n for files in (top, manifests, leases) for n in files if TEMP_NAME.fullmatch(n))
    if temps:
        note(f"{len(temps)} temp files of interrupted writes ({_some(temps)}); `probecache store gc` removes them")
    orphans = sorted(set(segment_attempts(root)) - referenced)
    if orphans:
        note(f"{len(orphans)} orphan segments no part references ({_some(orphans)}); readers never see them, "
             "`probecache store gc` removes old ones that no running attempt or upload holds")
    folders, _ = root.list_dir("segments", hidden=True)
    deleting = sorted(n for n in folders if deleting_target(n))
    if deleting:
        note(f"{len(deleting)} segments half-deleted by an interrupted gc ({_some(deleting)}); gc finishes them")
    links = root.links("segments")
    if links:
        note(f"segments/ holds symbolic links ({_some(links)}): readers follow a link a part references, gc never "
             "follows or removes one")
    broken = sorted(n for n in manifests if BROKEN_NAME.fullmatch(n))
    if broken:
        note(f"{len(broken)} commit records were set aside by extract because their segment was missing or "
             f"incomplete ({_some(broken)}); their shards were extracted again; readers ignore them and "
             "`probecache store gc` removes them once old")
    held = sorted(n.removesuffix(".json") for n in leases if n.startswith("shard-") and n.endswith(".json"))
    if held:
        note(f"{len(held)} segment leases ({_some(held)}): attempts running now, or killed ones whose lease gc "
             "removes once stale")
    strays = sorted(n for n in manifests if n.startswith("part-") and n.endswith(".parquet") and not PART_NAME.match(n))
    for name in strays:
        note(f"manifests/{name}: not a part name the writer produces; readers ignore it")
    foreign = sorted(n for n in manifests if not n.startswith(".") and not (n.startswith("part-") and
                                                                           n.endswith(".parquet")))
    if foreign:
        note(f"manifests/ holds files that are not parts (ignored by readers): {_some(foreign)}")


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... (+{len(items) - _SHOW})" if len(items) > _SHOW else "")

