"""`verify`: prove every committed shard is exactly what its commit recorded and what the plan asked for.

Trust flows from the commit records only: each manifest part carries {file: [size, crc32c]} for every file
of its segment at commit time, so a flipped bit, a truncated chunk or a deleted file is caught without
trusting anything else in the segment folder. On top of the bytes, the part's rows must describe the
segment's arrays exactly (shapes, offsets tiling the token axis, rows 0..N-1) and the plan's examples for
that shard (ids and token counts), and plan.parquet must still hash to what store.json recorded.

Leftovers of the commit protocol (``.probecache-tmp-*`` files of a killed write, orphan segments of killed or
losing attempts, stale leases, ``.probecache-deleting-*`` folders of an interrupted gc, commit records a
repairing extract set aside) are expected and reported as notes, not problems. A missing manifests/ folder is a
problem: every commit record is gone, and the segments would all look like orphans to gc.

``checksums=False`` is the structural check `store gc` runs before deleting anything: everything above except
reading the recorded bytes (a recorded file must still exist with its recorded size).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
from probecache.manifests.schema import ManifestError, has_digest, read_part

from .header import SEAL, label_name_mismatch
from .integrity import file_crc32c, plan_digest
from .layout import StoreLayout
from .status import open_layout, parse_segment, part_files, segment_attempts

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


def verify_store(path: str | Path, workers: int = 8, checksums: bool = True) -> VerifyReport:
    """Check a store; StoreError only when ``path`` is not a store. Checksums run on ``workers`` threads;
    ``checksums=False`` checks recorded files by size only (no bytes read: what gc needs, see above)."""
    layout, info = open_layout(path)
    report = VerifyReport(str(layout.path), shards_total=int(info["plan"]["n_shards"]))
    plan = _check_plan(layout, info, report.problems.append)
    _check_manifests_folder(layout, report.problems.append)
    parts = part_files(layout)
    _check_part_names(layout, parts, report.notes.append)
    first_seen: dict[str, str] = {}  # example id -> the part that holds it first
    duplicates: list[str] = []
    file_checks: list[tuple[Path, str, str, int, str]] = []
    referenced: set[str] = set()
    examples = 0
    for shard, part in parts.items():
        checked = _check_part(layout, info, shard, part, plan, report.problems.append, file_checks)
        if checked is None:
            continue
        segment, ids = checked
        referenced.add(segment)
        report.parts_checked += 1
        examples += len(ids)
        note_example_ids(ids, part.name, first_seen, duplicates)
    if duplicates:
        report.problems.append(f"{len(duplicates)} example ids are committed twice: {_some(duplicates)}")
    _note_unsealed(info, parts, report.notes.append)

    # the expensive part: every recorded byte, read back and checksummed (or, structurally, every size)
    check = _check_file if checksums else _check_size
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for problem, size in pool.map(lambda job: check(*job), file_checks):
            report.files_checked += 1
            report.bytes_checked += size
            if problem:
                report.problems.append(problem)

    n_shards, n_examples = int(info["plan"]["n_shards"]), int(info["plan"].get("n_examples", -1))
    if set(parts) >= set(range(n_shards)):
        if examples != n_examples and report.parts_checked == len(parts):
            report.problems.append(f"complete store holds {examples} examples, plan says {n_examples}")
    else:
        report.notes.append(f"incomplete: {len(set(parts) & set(range(n_shards)))} of {n_shards} shards committed "
                            "(not an error; rerun the extract command to finish)")
    _leftovers(layout, referenced, report.notes.append)
    _name_the_repair(layout, parts, report.notes.append)
    return report


def _check_manifests_folder(layout: StoreLayout, problem: Callable[[str], None]) -> None:
    """manifests/ exists from the moment store.json does (extract creates it first). Without it, while attempts
    exist, the commit records are gone: readers see an empty store and every segment looks like an orphan."""
    if layout.manifests.is_dir():
        return
    stats = len(list(layout.stats.glob("shard-*.json"))) if layout.stats.is_dir() else 0
    segments = len(segment_attempts(layout))
    if segments or stats:
        problem(f"manifests/ is missing while segments/ holds {segments} segments and stats/ {stats} files: the "
                "commit records are gone and readers see no examples; restore manifests/ from a copy of the store, "
                "or rerun the extract command to extract every shard again (gc deletes nothing until then)")


def _name_the_repair(layout: StoreLayout, parts: dict[int, Path], note: Callable[[str], None]) -> None:
    """The fix for commit records whose segment is missing or incomplete: extract sets them aside and redoes them."""
    from .repair import part_damage

    broken = [shard for shard, part in sorted(parts.items()) if part_damage(layout, shard, part) is not None]
    if broken:
        note(f"{len(broken)} committed shards ({_some([str(s) for s in broken])}) have a missing, incomplete or "
             "damaged commit record or segment: rerun the extract command: it moves those records aside to "
             "manifests/.probecache-broken-part-* and extracts the shards again")


def _note_unsealed(info: dict, parts: dict[int, Path], note: Callable[[str], None]) -> None:
    """Stores written before store.json's seal and the parts' digests are read, but with fewer checks: say so."""
    if SEAL not in info:
        note("store.json carries no checksum (written before probecache sealed headers): readers cross-check its "
             "fields against the arrays, but a hand edit of other fields goes unnoticed")
    unsealed = sorted(p.name for p in parts.values() if not _has_digest(p))
    if unsealed:
        note(f"{len(unsealed)} parts carry no content digest (written before digests existed): {_some(unsealed)}")


def _has_digest(part: Path) -> bool:
    try:
        return has_digest(part)
    except Exception:  # an unreadable part is reported as a problem by _check_part
        return True


def _check_part_names(layout: StoreLayout, parts: dict[int, Path], note: Callable[[str], None]) -> None:
    """A `part-*.parquet` the writer would not have named (a stray copy) is ignored by readers: say so."""
    if not layout.manifests.is_dir():
        return
    for p in sorted(layout.manifests.glob("part-*.parquet")):
        if p not in parts.values():
            note(f"manifests/{p.name}: not a part name the writer produces; readers ignore it")


def _check_plan(layout: StoreLayout, info: dict, problem: Callable[[str], None]) -> dict[int, dict[str, int]] | None:
    """plan.parquet against store.json; returns shard -> {example id: n_tokens}, or None if unreadable."""
    if not layout.plan.is_file():
        problem("plan.parquet is missing: parts cannot be checked against the plan")
        return None
    try:
        table = pq.read_table(layout.plan)
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
    for eid, shard, n in zip(ids, shards, tokens, strict=True):
        by_shard.setdefault(shard, {})[eid] = n
    return by_shard


def _check_part(layout: StoreLayout, info: dict, shard: int, part: Path, plan: dict[int, dict[str, int]] | None,
                problem: Callable[[str], None], file_checks: list) -> tuple[str, list[str]] | None:
    """One commit record against itself, its segment's arrays and the plan; queues its file checks.

    Returns (segment, example ids), or None when the part is too damaged to say which examples it holds.
    """
    where = f"manifests/{part.name}"
    record = read_part_record(part, shard, plan, problem)
    if record is None:
        return None
    table, stats, segment, ids, named_ok = record
    if "label_name" in table.column_names:
        wrong = label_name_mismatch(info["dataset"]["label_names"], table["label"].to_pylist(),
                                    table["label_name"].to_pylist())
        if wrong:
            problem(f"{where}: label {wrong[0]} is {wrong[1]!r} here, store.json's label_names say "
                    f"{info['dataset']['label_names']} (store.json edited?)")
    if not named_ok:
        return segment, ids  # never touch a path built from a name we did not write
    folder = layout.segments / segment
    if not folder.is_dir():
        problem(f"{where}: its segment folder segments/{segment} is missing")
        return segment, ids
    files = stats.get("files")
    if not isinstance(files, dict) or not files:
        problem(f"{where}: records no segment files (committed before checksums were recorded?)")
    else:
        _queue_files(layout, segment, files, where, problem, file_checks)
    _check_shapes(folder, info, where, len(ids), sum(table["n_tokens"].to_pylist()), problem)
    return segment, ids


def read_part_record(part: Path, shard: int, plan: dict[int, dict[str, int]] | None,
                     problem: Callable[[str], None]) -> tuple[pa.Table, dict, str, list[str], bool] | None:
    """Read a commit record (a manifest part, local or mirrored) and check it against itself and the plan, no
    segment bytes: (table, commit stats, segment, example ids, whether the segment name is one of ours and may
    become a path), or None when the part is unreadable or too damaged to say. Shared with remote_verify.py."""
    where = f"manifests/{part.name}"
    try:
        table, stats = read_part(part, where)
    except ManifestError as e:
        problem(str(e))
        return None
    checked = _check_part_record(where, shard, table, stats, plan, problem)
    return None if checked is None else (table, stats, *checked)


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
    _check_tiling(where, offsets, n_tokens, ids, total, problem)
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


def _queue_files(layout: StoreLayout, segment: str, files: dict, where: str, problem: Callable[[str], None],
                 file_checks: list) -> None:
    root = layout.segments / segment
    recorded = set()
    for rel, entry in files.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or not isinstance(entry, list) or len(entry) != 2:
            problem(f"{where}: malformed file record {rel!r}: {entry!r}")
            continue
        recorded.add(rel)
        file_checks.append((root, rel, f"segments/{segment}/{rel}", int(entry[0]), str(entry[1])))
    # a file nobody recorded may be read as data (a stray chunk key) or hide a partial overwrite
    for directory, _, names in os.walk(root):
        for name in names:
            rel = (Path(directory) / name).relative_to(root).as_posix()
            if rel not in recorded:
                problem(f"segments/{segment}/{rel}: file is not in the commit record of {where}")


def _check_size(root: Path, rel: str, label: str, size: int, crc: str) -> tuple[str | None, int]:
    """(problem or None, 0): the structural check of one recorded file (present, recorded size; no bytes read)."""
    try:
        actual_size = (root / rel).stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        return f"{label}: recorded file is missing", 0
    if actual_size != size:
        return f"{label}: {actual_size} bytes, {size} recorded (truncated or rewritten)", 0
    return None, 0


def _check_file(root: Path, rel: str, label: str, size: int, crc: str) -> tuple[str | None, int]:
    """(problem or None, bytes read) for one recorded file."""
    path = root / rel
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        return f"{label}: recorded file is missing", 0
    if actual_size != size:
        return f"{label}: {actual_size} bytes, {size} recorded (truncated or rewritten)", 0
    actual = file_crc32c(path)
    if actual != crc:
        return f"{label}: crc32c {actual}, {crc} recorded (corrupted)", size
    return None, size


def _check_shapes(folder, info: dict, where: str, n: int, total: int, problem: Callable[[str], None]) -> None:
    """The arrays' metadata against the rows: hidden (L+1, T, d), mean/last (N, L+1, d), logits (N, V).
    ``folder`` is a segment folder or a zarr store over one (the remote verify passes a FetchingStore)."""
    import zarr  # only verify needs it; status and gc stay light

    layers, d = info["model"]["n_layers"], info["model"]["hidden_size"]
    expected = {
        "hidden": (layers, max(total, 1), d),  # the writer never creates a zero-length array
        "mean": (n, layers, d),
        "last": (n, layers, d),
    }
    if info.get("capture", {}).get("logits"):
        expected["logits"] = (n, info["model"].get("vocab_size"))
    if info.get("capture", {}).get("token_ids"):
        expected["token_ids"] = (max(total, 1),)  # aligned with hidden's token axis
    try:
        group = zarr.open_group(str(folder) if isinstance(folder, Path) else folder, mode="r")
        for name, shape in expected.items():
            if name not in group:
                problem(f"{where}: segment has no {name!r} array")
                continue
            actual = tuple(group[name].shape)
            if actual != shape:
                problem(f"{where}: {name} has shape {actual}, rows and store.json imply {shape}")
    except Exception as e:  # zarr raises many types for damaged metadata; the checksums say which file
        problem(f"{where}: segment arrays cannot be opened ({type(e).__name__}: {e})")


def _leftovers(layout: StoreLayout, referenced: set[str], note: Callable[[str], None]) -> None:
    """Expected debris of the commit protocol: reported so `gc` can be run, never an error."""
    from .commit import TEMP_NAME
    from .lease import LEASES
    from .repair import BROKEN_NAME
    from .status import deleting_target, segment_links

    leases = layout.path / LEASES
    temps = sorted(p.name for folder in (layout.path, layout.manifests, leases) if folder.is_dir()
                   for p in folder.iterdir() if TEMP_NAME.fullmatch(p.name))
    if temps:
        note(f"{len(temps)} temp files of interrupted writes ({_some(temps)}); `probecache store gc` removes them")
    orphans = sorted(set(segment_attempts(layout)) - referenced)
    if orphans:
        note(f"{len(orphans)} orphan segments no part references ({_some(orphans)}); readers never see them, "
             "`probecache store gc` removes old ones that no running attempt holds")
    deleting = sorted(p.name for p in layout.segments.iterdir() if deleting_target(p.name)) \
        if layout.segments.is_dir() else []
    if deleting:
        note(f"{len(deleting)} segments half-deleted by an interrupted gc ({_some(deleting)}); gc finishes them")
    links = segment_links(layout)
    if links:
        note(f"segments/ holds symbolic links ({_some(links)}): readers follow a link a part references, gc never "
             "follows or removes one")
    broken = sorted(p.name for p in layout.manifests.iterdir() if BROKEN_NAME.fullmatch(p.name)) \
        if layout.manifests.is_dir() else []
    if broken:
        note(f"{len(broken)} commit records were set aside by extract because their segment was missing or "
             f"incomplete ({_some(broken)}); their shards were extracted again; readers ignore them and "
             "`probecache store gc` removes them once old")
    held = sorted(p.name.removesuffix(".json") for p in leases.glob("shard-*.json")) if leases.is_dir() else []
    if held:
        note(f"{len(held)} segment leases ({_some(held)}): attempts running now, or killed ones whose lease gc "
             "removes once stale")
    if layout.manifests.is_dir():
        foreign = sorted(p.name for p in layout.manifests.iterdir()
                         if not p.name.startswith(".") and not (p.name.startswith("part-") and p.suffix == ".parquet"))
        if foreign:
            note(f"manifests/ holds files that are not parts (ignored by readers): {_some(foreign)}")


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... (+{len(items) - _SHOW})" if len(items) > _SHOW else "")


def note_example_ids(ids, part_name: str, first_seen: dict[str, str], duplicates: list[str]) -> None:
    """Record which manifest part first committed each example id; an id seen again is a duplicate commit."""
    for eid in ids:
        if eid in first_seen:
            duplicates.append(f"{eid} ({first_seen[eid]} and {part_name})")
        else:
            first_seen[eid] = part_name
