"""`store status`, `store verify` and `store gc` on real stores made by the extractor on the tiny model.

Each damage test breaks one thing the way a disk, a person or a killed job would, and checks verify names
it; the gc tests check the age gate, that referenced segments are never touched, and crash recovery.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from probecache.extract.run import extract
from probecache.manifests.schema import part_stats
from probecache.store.errors import StoreError
from probecache.store.gc import gc_store, parse_age
from probecache.store.integrity import plan_digest
from probecache.store.status import store_status
from probecache.store.verify import verify_store
from typer.testing import CliRunner

from probecache.cli import app

runner = CliRunner()
DAY = 86400


@pytest.fixture
def store(extract_config) -> Path:
    """A complete store: 30 examples in 4 shards of 8, 8, 8, 6."""
    return extract(extract_config()).store_path


def _part(store: Path, shard: int) -> Path:
    return store / "manifests" / f"part-{shard:05d}.parquet"


def _segment(store: Path, shard: int) -> Path:
    return store / "segments" / part_stats(_part(store, shard))["segment"]


def _rewrite_part(part: Path, transform=None, **stats_changes) -> None:
    """Rewrite a part's rows and/or commit stats, keeping the rest of its Parquet metadata, and seal it again
    (its content digest recomputed): a record that is wrong yet self-consistent, as a buggy writer would leave
    it, so the checks behind the digest are what the test exercises."""
    from probecache.manifests.schema import DIGEST_KEY, STATS_KEY, content_digest

    table = pq.read_table(part)
    meta = dict(table.schema.metadata)
    stats = json.loads(meta[STATS_KEY])
    meta[STATS_KEY] = json.dumps({**stats, **stats_changes}).encode()
    if transform is not None:
        table = transform(table)
    meta[DIGEST_KEY] = content_digest(table.replace_schema_metadata(None), meta[STATS_KEY]).encode()
    pq.write_table(table.replace_schema_metadata(meta), part)


def _problems(store: Path) -> list[str]:
    report = verify_store(store)
    assert not report.ok
    return report.problems


def _age_tree(path: Path, seconds: float) -> None:
    """Make every file and folder under ``path`` look untouched for ``seconds``."""
    old = time.time() - seconds
    for directory, _, files in os.walk(path):
        for name in [*files, None]:
            target = directory if name is None else os.path.join(directory, name)
            os.utime(target, (old, old))


def _orphan(store: Path, extract_config, shard: int = 1) -> Path:
    """Delete a part and rerun the extraction: the shard's old attempt is now an orphan segment."""
    old = _segment(store, shard)
    _part(store, shard).unlink()
    extract(extract_config())
    assert old.is_dir() and _segment(store, shard) != old
    return old


# ---- verify ---------------------------------------------------------------------------------------


def test_clean_store_verifies_ok(store):
    report = verify_store(store)
    assert report.ok, report.problems
    recorded = sum(len(part_stats(_part(store, s))["files"]) for s in range(4))
    assert report.parts_checked == 4 and report.files_checked == recorded > 4
    assert report.bytes_checked == sum(s["bytes_stored"] for s in map(part_stats, store.glob("manifests/*")))
    assert report.notes == []
    result = runner.invoke(app, ["store", "verify", str(store)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("ok: 4 parts of 4 shards")


def test_flipped_byte_in_a_hidden_chunk_is_named(store):
    segment = _segment(store, 1)
    chunk = next(p for p in (segment / "hidden" / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    rel = f"segments/{segment.name}/{chunk.relative_to(segment).as_posix()}"
    problems = _problems(store)
    assert len(problems) == 1 and problems[0].startswith(rel) and "crc32c" in problems[0], problems
    result = runner.invoke(app, ["store", "verify", str(store)])
    assert result.exit_code == 1 and rel in result.stdout and "FAILED: 1 problems" in result.stdout


def test_truncated_file_is_caught_by_size(store):
    chunk = next(p for p in (_segment(store, 0) / "mean" / "c").rglob("*") if p.is_file())
    with open(chunk, "r+b") as f:
        f.truncate(chunk.stat().st_size - 7)
    problems = _problems(store)
    assert any(chunk.name in p and "truncated" in p for p in problems), problems


def test_deleted_chunk_file_is_caught_although_zarr_would_read_zeros(store):
    chunk = next(p for p in (_segment(store, 2) / "last" / "c").rglob("*") if p.is_file())
    chunk.unlink()
    problems = _problems(store)
    assert problems == [f"segments/{_segment(store, 2).name}/{chunk.relative_to(_segment(store, 2)).as_posix()}: "
                        "recorded file is missing"], problems


def test_unrecorded_file_in_a_committed_segment_is_a_problem(store):
    (_segment(store, 0) / "hidden" / "c" / "0" / "9").mkdir(parents=True)
    (_segment(store, 0) / "hidden" / "c" / "0" / "9" / "0").write_bytes(b"stray")
    assert any("not in the commit record" in p for p in _problems(store))


def test_missing_segment_folder_is_named(store):
    segment = _segment(store, 2)
    shutil.rmtree(segment)
    problems = _problems(store)
    assert any(f"segments/{segment.name} is missing" in p and "part-00002" in p for p in problems), problems


def test_part_duplicated_under_another_shard_number_reports_duplicate_ids(store):
    shutil.copy(_part(store, 1), _part(store, 4))
    problems = _problems(store)
    ids = pq.read_table(_part(store, 1))["example_id"].to_pylist()
    duplicated = next(p for p in problems if "committed twice" in p)
    assert duplicated.startswith(f"{len(ids)} example ids") and ids[0] in duplicated
    assert any("part-00004" in p and "not in the plan" in p for p in problems), problems


def test_part_with_a_row_removed_mismatches_the_plan_and_the_arrays(store):
    part = _part(store, 0)
    table = pq.read_table(part)
    dropped = table["example_id"][table.num_rows - 1].as_py()
    _rewrite_part(part, lambda t: t.slice(0, t.num_rows - 1))
    problems = _problems(store)
    assert any("planned examples are missing" in p and dropped in p for p in problems), problems
    assert any("hidden has shape" in p for p in problems), problems
    assert any("its stats say 8" in p for p in problems), problems


def test_overlapping_token_offsets_are_caught(store):
    part = _part(store, 3)

    def shift(t: pa.Table) -> pa.Table:
        offsets = t["token_offset"].to_pylist()
        offsets[2] -= 1
        return t.set_column(t.schema.get_field_index("token_offset"), "token_offset",
                            pa.array(offsets, pa.int64()))

    _rewrite_part(part, shift)
    assert any("overlap" in p and "part-00003" in p for p in _problems(store))


def test_plan_content_change_is_a_hash_mismatch(store):
    plan = pq.read_table(store / "plan.parquet")
    split = pc.if_else(pc.equal(plan["example_id"], "r00"), "test", plan["split"])
    pq.write_table(plan.set_column(plan.schema.get_field_index("split"), "split", split), store / "plan.parquet")
    problems = _problems(store)
    assert len(problems) == 1 and "plan.sha256" in problems[0], problems


def test_plan_digest_is_the_same_algorithm_as_the_extractor(store):
    from probecache.extract.plan import plan_digest as extract_digest

    table = pq.read_table(store / "plan.parquet")
    recorded = json.loads((store / "store.json").read_text())["plan"]["sha256"]
    assert plan_digest(table) == extract_digest(table) == recorded
    other = pa.table({"example_id": ["a", "b"], "shard_id": pa.array([0, 1], pa.int32()), "x": [1.5, None]})
    assert plan_digest(other) == extract_digest(other) != plan_digest(other.slice(0, 1))


def test_leftovers_are_notes_not_problems(store, extract_config):
    orphan = _orphan(store, extract_config)
    (store / "manifests" / f".probecache-tmp-part-00001.parquet-00000000-1-{'0' * 32}").write_bytes(b"half a commit")
    report = verify_store(store)
    assert report.ok, report.problems
    assert any("temp files" in n for n in report.notes) and any(orphan.name in n for n in report.notes)


def test_verify_of_a_folder_that_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a probecache store"):
        verify_store(tmp_path)
    result = runner.invoke(app, ["store", "verify", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.output


def test_verify_cli_caps_the_problem_lines(store):
    folder = _segment(store, 0) / "junk"
    folder.mkdir()
    for i in range(60):
        (folder / f"f{i}").write_bytes(b"x")
    result = runner.invoke(app, ["store", "verify", str(store)])
    assert result.exit_code == 1
    assert result.stdout.count("problem: ") == 50 and "... and 10 more problems" in result.stdout
    listed = runner.invoke(app, ["store", "verify", str(store), "--json"])
    assert listed.exit_code == 1 and len(json.loads(listed.stdout)["problems"]) == 60


# ---- status ---------------------------------------------------------------------------------------


def test_status_of_a_complete_store(store):
    status = store_status(store)
    assert status["complete"] and status["counts"] == {"committed": 4, "in_progress": 0, "failed": 0, "stale": 0,
                                                       "never_started": 0}
    assert status["examples_committed"] == status["examples_planned"] == 30
    assert status["tokens_committed"] == status["tokens_planned"] > 0 and status["eta_seconds"] is None
    result = runner.invoke(app, ["store", "status", str(store)])
    assert result.exit_code == 0 and "4/4 committed" in result.stdout and "complete" in result.stdout


def test_status_with_a_part_removed_is_in_progress_then_stale_then_never_started(store):
    tokens = part_stats(_part(store, 2))["n_tokens"]
    segment = _segment(store, 2)
    _part(store, 2).unlink()
    status = store_status(store)
    assert status["shards"]["in_progress"][0]["shard_id"] == 2 and status["shards"]["in_progress"][0]["segment"] \
        == segment.name
    assert status["examples_committed"] == 22 and status["tokens_committed"] == status["tokens_planned"] - tokens
    assert not status["complete"]
    assert [s["shard_id"] for s in store_status(store, stale_after=0)["shards"]["stale"]] == [2]
    shutil.rmtree(segment)
    assert store_status(store)["shards"]["never_started"] == [2]


def test_status_rate_and_eta_from_commit_times(store):
    for shard in (2, 3):
        _part(store, shard).unlink()
        shutil.rmtree(store / "segments" / [s for s in os.listdir(store / "segments") if f"-{shard:05d}-" in s][0])
    _rewrite_part(_part(store, 0), committed_at="2025-01-01T00:00:00Z")
    _rewrite_part(_part(store, 1), committed_at="2025-01-01T00:00:10Z")
    status = store_status(store)
    rate = part_stats(_part(store, 1))["n_tokens"] / 10  # the first part's tokens predate the span
    assert status["tokens_per_second"] == pytest.approx(rate, abs=0.1)
    remaining = status["tokens_planned"] - status["tokens_committed"]
    assert status["eta_seconds"] == pytest.approx(remaining / rate, abs=0.06)  # rounded to 0.1 s
    assert "ETA" in runner.invoke(app, ["store", "status", str(store)]).stdout


def test_status_shows_the_tail_of_a_failed_log_of_the_newest_attempt(store):
    segment = _segment(store, 3)
    _part(store, 3).unlink()
    logs = store / "logs"
    logs.mkdir()
    (logs / f"{segment.name}.failed").write_text("".join(f"line {i}\n" for i in range(25)) + "RuntimeError: boom\n")
    status = store_status(store)
    failed = status["shards"]["failed"]
    assert [f["shard_id"] for f in failed] == [3] and failed[0]["segment"] == segment.name
    assert failed[0]["tail"] == [f"line {i}" for i in range(16, 25)] + ["RuntimeError: boom"]
    human = runner.invoke(app, ["store", "status", str(store)])
    assert "RuntimeError: boom" in human.stdout and "line 15" not in human.stdout
    # a newer attempt of the shard (here one that failed before creating its folder) is what counts
    newer = segment.name.split("-")
    newer[2] = "29991231T000000"  # far in the future: newest by start time
    (logs / ("-".join(newer) + ".failed")).write_text("OSError: disk full\n")
    failed = store_status(store)["shards"]["failed"]
    assert failed[0]["segment"] == "-".join(newer) and failed[0]["tail"] == ["OSError: disk full"]


# ---- gc -------------------------------------------------------------------------------------------


def test_gc_removes_an_orphan_only_when_old_enough(store, extract_config):
    orphan = _orphan(store, extract_config)
    stats = store / "stats" / f"{orphan.name}.json"
    size = sum(p.stat().st_size for p in orphan.rglob("*") if p.is_file())
    kept = gc_store(store, older_than_seconds=3600)
    assert kept.removed == [] and [k.path for k in kept.kept] == [f"segments/{orphan.name}"] and orphan.is_dir()
    dry = gc_store(store, older_than_seconds=0, dry_run=True)
    assert [r.path for r in dry.removed] == [f"segments/{orphan.name}", f"stats/{orphan.name}.json"]
    assert orphan.is_dir() and stats.is_file()
    report = gc_store(store, older_than_seconds=0)
    assert [r.kind for r in report.removed] == ["segment", "stats"] and report.removed[0].bytes == size
    assert report.bytes_freed == size + report.removed[1].bytes
    assert not orphan.exists() and not stats.exists()
    assert verify_store(store).ok and verify_store(store).notes == []


def test_gc_age_is_the_later_of_attempt_start_and_last_write(store, extract_config):
    orphan = _orphan(store, extract_config)
    _age_tree(orphan, 2 * DAY)  # quiet for two days, but its name says it started just now
    assert gc_store(store, older_than_seconds=DAY).removed == []
    # an attempt that started long ago but wrote recently (a long shard still running) survives too
    running = orphan.with_name("shard-00001-20200101T000000-0badf00d")
    shutil.copytree(orphan, running, copy_function=shutil.copyfile)  # fresh mtimes: it is writing
    assert {r.path for r in gc_store(store, older_than_seconds=DAY).kept} == {
        f"segments/{orphan.name}", f"segments/{running.name}"}
    _age_tree(running, 2 * DAY)
    report = gc_store(store, older_than_seconds=DAY)
    assert [r.path for r in report.removed] == [f"segments/{running.name}"] and orphan.is_dir()


def test_gc_never_touches_referenced_segments(store, extract_config):
    orphan = _orphan(store, extract_config)
    referenced = {_segment(store, s).name for s in range(4)}
    _age_tree(store, 30 * DAY)
    report = gc_store(store, older_than_seconds=0)
    assert [r.path for r in report.removed if r.kind == "segment"] == [f"segments/{orphan.name}"]
    assert set(os.listdir(store / "segments")) == referenced
    assert {p.stem for p in (store / "stats").glob("*.json")} == referenced
    assert verify_store(store).ok


def test_gc_refuses_to_run_when_a_part_is_unreadable(store, extract_config):
    orphan = _orphan(store, extract_config)
    _part(store, 3).write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="does not verify, so gc deletes nothing"):
        gc_store(store, older_than_seconds=0)
    assert orphan.is_dir()


def _temp_name(target: str, tag: str | None = None, pid: int | None = None) -> str:
    """A commit temp file name as store/commit.py writes it: the writer's machine tag and pid, then 32 hex."""
    from probecache.store.lease import machine_tag

    return f".probecache-tmp-{target}-{tag or machine_tag()}-{pid if pid is not None else os.getpid()}-{'a' * 32}"


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_gc_removes_old_commit_temp_files(store):
    manifests = store / "manifests"
    dead = _dead_pid()
    old = manifests / _temp_name("part-00001.parquet", pid=dead)  # its writer was killed
    young = manifests / _temp_name("part-00002.parquet", pid=dead)
    elsewhere = manifests / _temp_name("part-00003.parquet", tag="abcdef01", pid=1)  # a writer on another machine
    running = manifests / _temp_name("part-00002.parquet")  # this process: a writer about to link it
    for p in (old, young, elsewhere, running):
        p.write_bytes(b"x" * 100)
    os.link(_part(store, 0), linked := manifests / _temp_name("part-00000.parquet", pid=dead))  # killed after link
    for p in (old, linked, running, elsewhere):
        os.utime(p, (time.time() - DAY, time.time() - DAY))
    report = gc_store(store, older_than_seconds=3600)
    assert {r.path: r.bytes for r in report.removed} == {f"manifests/{old.name}": 100, f"manifests/{linked.name}": 0,
                                                         f"manifests/{elsewhere.name}": 100}
    assert young.exists() and running.exists() and not old.exists() and not linked.exists() and verify_store(store).ok
    # with --older-than 0: a dead writer's temp goes at once, another machine's waits out the lease TTL
    os.utime(elsewhere, None) if elsewhere.exists() else elsewhere.write_bytes(b"x")
    report = gc_store(store, older_than_seconds=0)
    assert [r.path for r in report.removed] == [f"manifests/{young.name}"] and elsewhere.exists() and running.exists()


def test_gc_killed_mid_delete_is_finished_by_the_next_gc(store, extract_config):
    orphan = _orphan(store, extract_config)
    code = f"from probecache.store.gc import gc_store; gc_store({str(store)!r}, 0)"
    env = {**os.environ, "PROBECACHE_CRASH_AT": "gc-delete"}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()
    hidden = store / "segments" / f".probecache-deleting-{orphan.name}"
    assert hidden.is_dir() and not orphan.exists()
    report = verify_store(store)  # readers never referenced it: the store is whole meanwhile
    assert report.ok and any(".probecache-deleting-" in n for n in report.notes)
    assert store_status(store)["complete"]
    again = gc_store(store, older_than_seconds=DAY)  # finished whatever the age: it was old when renamed
    assert [r.kind for r in again.removed] == ["deleting", "stats"]
    assert not hidden.exists() and not (store / "stats" / f"{orphan.name}.json").exists()
    assert verify_store(store).ok and verify_store(store).notes == []


# ---- CLI ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [("0", 0), ("30s", 30), ("15m", 900), ("6h", 21600), ("2d", 172800)])
def test_parse_age(text, seconds):
    assert parse_age(text) == seconds


def test_cli_smoke_json_and_dry_run(store, extract_config):
    orphan = _orphan(store, extract_config)
    status = runner.invoke(app, ["store", "status", str(store), "--json"])
    assert status.exit_code == 0 and json.loads(status.stdout)["counts"]["committed"] == 4
    verify = runner.invoke(app, ["store", "verify", str(store), "--json"])
    assert verify.exit_code == 0 and json.loads(verify.stdout)["ok"] is True
    dry = runner.invoke(app, ["store", "gc", str(store), "--older-than", "0", "--dry-run"])
    assert dry.exit_code == 0 and "would remove 1 segment" in dry.stdout and orphan.name in dry.stdout
    assert orphan.is_dir()
    done = runner.invoke(app, ["store", "gc", str(store), "--older-than", "0", "--json"])
    report = json.loads(done.stdout)
    assert done.exit_code == 0 and report["removed"][0]["path"] == f"segments/{orphan.name}"
    assert report["bytes_freed"] > 0 and not orphan.exists()


@pytest.mark.parametrize("value", ["5x", "6", "-1h", "1.5h", ""])
def test_cli_bad_older_than_is_one_line_naming_the_forms(store, value):
    result = runner.invoke(app, ["store", "gc", str(store), "--older-than", value])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: --older-than") and "\n" not in err and "30s, 15m, 6h, 2d" in err


def test_a_stray_part_copy_is_ignored_by_readers_and_noted_by_verify(store):
    from probecache import open_store

    manifests = Path(store) / "manifests"
    shutil.copy(manifests / "part-00001.parquet", manifests / "part-00001-copy.parquet")
    reader = open_store(store)
    ids = reader.manifest()["example_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 30  # the copy adds no duplicate rows
    assert reader.layout.committed_shards() == {0, 1, 2, 3}
    report = verify_store(store)
    assert report.ok and any("part-00001-copy.parquet" in n for n in report.notes)


# ---- gc that cannot lose data (issue 15): leases, checks before commit, refusals, reserved names, repair -------


def _reference_copy(store: Path, tmp_path: Path) -> Path:
    """An untouched copy of a freshly extracted store (same folder name: the store id)."""
    reference = tmp_path / "reference" / store.name
    shutil.copytree(store, reference)
    return reference


def _hook_crash_point(monkeypatch, hook) -> None:
    """Run ``hook(name)`` at every crash point a shard's extraction and commit reach (extract/shard.py,
    store/shard_commit.py), after the real one."""
    import probecache.extract.shard as shard_module
    import probecache.store.shard_commit as commit_module

    for module in (shard_module, commit_module):
        real = module.crash_point

        def point(name: str, real=real) -> None:
            real(name)
            hook(name)

        monkeypatch.setattr(module, "crash_point", point)


def test_gc_during_a_running_extract_keeps_the_segment_being_written(assert_same_store,
                                                                     store, extract_config, tmp_path, monkeypatch):
    """The issue's bug: `gc --older-than 0` while a shard is written deleted it; the extract then committed a part
    pointing at nothing. Now the attempt's lease keeps gc away, whatever --older-than says."""
    root = tmp_path / "racing"
    reports = []

    def gc_now(name: str) -> None:
        if name == "writer-append":  # on the writer thread, mid-segment: gc as another process would
            reports.append(gc_store(next(root.glob("*/store.json")).parent, older_than_seconds=0))

    _hook_crash_point(monkeypatch, gc_now)
    result = extract(extract_config(root=str(root)))
    assert not any(r.kind == "segment" for report in reports for r in report.removed)
    leased = {k.path for report in reports for k in report.kept if (k.reason or "").startswith("lease")}
    assert len(leased) == 4  # every shard's attempt was seen in flight, and kept for its lease
    assert not (result.store_path / "leases").exists() or not list((result.store_path / "leases").iterdir())
    assert_same_store(result.store_path, store, 30)


@pytest.mark.parametrize("damage", ["segment deleted", "chunk deleted", "chunk truncated", "deleted mid-write"])
def test_a_segment_damaged_before_its_commit_is_written_again(assert_same_store,
                                                              damage, store, extract_config, tmp_path, monkeypatch,
                                                              capfd):
    root = tmp_path / "damaged"
    hit, appended = [], []

    def break_segment(name: str) -> None:
        appended.append(name == "writer-append")
        if hit or name != ("writer-append" if damage == "deleted mid-write" else "stats-written"):
            return
        if damage == "deleted mid-write":
            if sum(appended) < 5:
                return  # the first shard's 5th example: its writer has more to write into the folder
            (segment,) = root.glob("*/segments/shard-00000-*")
            hit.append(segment.name)
            shutil.rmtree(segment)
            return
        (segment,) = root.glob("*/segments/shard-00000-*")  # the shard being committed right now
        hit.append(segment.name)
        chunk = next(p for p in sorted((segment / "hidden" / "c").rglob("*")) if p.is_file())
        if damage == "segment deleted":
            shutil.rmtree(segment)
        elif damage == "chunk deleted":
            chunk.unlink()
        else:
            with open(chunk, "r+b") as f:
                f.truncate(10)

    _hook_crash_point(monkeypatch, break_segment)
    result = extract(extract_config(root=str(root)))
    assert result.totals.shards == 4
    assert "shard 0: its segment was deleted or changed while it was being written" in capfd.readouterr().err
    assert hit[0] not in set(pq.read_table(_part(result.store_path, 0))["segment"].to_pylist())
    assert_same_store(result.store_path, store, 30)


def test_a_shard_whose_segment_keeps_vanishing_fails_with_one_line(extract_config, tmp_path, monkeypatch):
    root = tmp_path / "vanishing"

    def delete_shard_0(name: str) -> None:
        if name == "stats-written":
            for segment in root.glob("*/segments/shard-00000-*"):
                shutil.rmtree(segment)

    _hook_crash_point(monkeypatch, delete_shard_0)
    config = extract_config(root=str(root))
    result = runner.invoke(app, ["extract", "--dataset", config.dataset, "--model", config.model, "--root", str(root),
                                 "--dtype", "fp32", "--shard-size", "8", "--batch-tokens", "96", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    *warnings, error = result.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: shard 0: its segment was deleted") for w in warnings)
    assert error.startswith("error: shard 0") and "3 times" in error and "rerun the same command" in error
    (folder,) = root.iterdir()
    assert not _part(folder, 0).exists() and verify_store(folder).ok  # nothing broken was committed


def _fake_segment(store: Path, name: str = "shard-00001-20200101T000000-0badf00d") -> Path:
    """An orphan attempt folder (a copy of shard 1's segment under another attempt name), idle for 30 days."""
    orphan = store / "segments" / name
    shutil.copytree(_segment(store, 1), orphan)
    _age_tree(orphan, 30 * DAY)
    return orphan


def _write_lease(store: Path, segment: str, heartbeat: float, holder: dict | None = None) -> Path:
    lease = store / "leases" / f"{segment}.json"
    lease.parent.mkdir(exist_ok=True)
    lease.write_text(json.dumps({"segment": segment, "heartbeat": heartbeat,
                                 "holder": holder or {"host": "elsewhere", "pid": 1, "boot_id": "another-machine",
                                                      "pid_ns": "pid:[1]", "start": "1"}}))
    return lease


def test_gc_never_deletes_a_leased_segment_whatever_older_than(store):
    from probecache.store.lease import LeaseKeeper
    from probecache.store.roots import LocalRoot

    orphan = _fake_segment(store)
    keeper = LeaseKeeper(LocalRoot(store))
    keeper.hold(orphan.name)  # held by this very process: alive whatever the clock says
    try:
        for now in (None, time.time() + 30 * DAY):
            report = gc_store(store, older_than_seconds=0, now=now)
            assert report.removed == [] and orphan.is_dir()
            assert [(k.path, k.reason.split(":")[0]) for k in report.kept] == [(f"segments/{orphan.name}", "lease")]
        assert "live lease" in runner.invoke(app, ["store", "gc", str(store), "--older-than", "0"]).stdout
    finally:
        keeper.close()
    report = gc_store(store, older_than_seconds=0)
    assert [r.path for r in report.removed] == [f"segments/{orphan.name}"] and not orphan.exists()


def test_a_lease_from_another_machine_expires_after_its_ttl(store):
    from probecache.store.lease import LEASE_TTL_SECONDS

    orphan = _fake_segment(store)
    lease = _write_lease(store, orphan.name, heartbeat=time.time())
    assert gc_store(store, older_than_seconds=0).removed == [] and orphan.is_dir()
    # a heartbeat from the far future does not pin a segment forever: the lease's own mtime decides then
    _write_lease(store, orphan.name, heartbeat=time.time() + 1000 * DAY)
    later = time.time() + LEASE_TTL_SECONDS + 60
    report = gc_store(store, older_than_seconds=0, now=later)
    assert {(r.kind, r.path) for r in report.removed} == {("segment", f"segments/{orphan.name}"),
                                                          ("lease", f"leases/{orphan.name}.json")}
    assert not orphan.exists() and not lease.exists() and verify_store(store).ok


def test_a_lease_whose_holder_died_on_this_machine_is_stale_at_once(store):
    orphan = _fake_segment(store)
    code = ("import os, sys; from probecache.store.lease import LeaseKeeper; from probecache.store.roots import "
            f"LocalRoot; LeaseKeeper(LocalRoot({str(store)!r})).hold({orphan.name!r}); os._exit(0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    assert (store / "leases" / f"{orphan.name}.json").is_file()  # a killed attempt leaves its lease behind
    report = gc_store(store, older_than_seconds=0)
    assert {r.kind for r in report.removed} == {"segment", "lease"} and not orphan.exists()


def test_gc_refuses_a_store_whose_manifests_were_deleted_and_a_rerun_repairs_it(assert_same_store,
                                                                                store, extract_config, tmp_path,
                                                                                one_line_error):
    reference = _reference_copy(store, tmp_path)
    segments = set(os.listdir(store / "segments"))
    shutil.rmtree(store / "manifests")
    report = verify_store(store)  # this said "ok: 0 parts of 4 shards"
    assert not report.ok and "manifests/ is missing" in report.problems[0]
    for dry_run in (True, False):
        with pytest.raises(StoreError, match="does not verify, so gc deletes nothing"):
            gc_store(store, older_than_seconds=0, dry_run=dry_run)
    one_line_error(runner.invoke(app, ["store", "gc", str(store), "--older-than", "0"]), "manifests/ is missing")
    assert set(os.listdir(store / "segments")) == segments
    assert extract(extract_config()).shards_run == 4  # every shard again: the old segments are orphans now
    assert_same_store(store, reference, 30)
    assert {r.path for r in gc_store(store, older_than_seconds=0).removed if r.kind == "segment"} == {
        f"segments/{s}" for s in segments}


def test_gc_refuses_a_part_overwritten_by_another_and_a_rerun_repairs_it(assert_same_store,
                                                                         store, extract_config, tmp_path):
    reference = _reference_copy(store, tmp_path)
    real = _segment(store, 2)
    shutil.copy(_part(store, 1), _part(store, 2))  # shard 2's commit record now says shard 1
    assert any("part-00002" in p for p in _problems(store))
    with pytest.raises(StoreError, match="does not verify"):
        gc_store(store, older_than_seconds=0)  # it would have deleted shard 2's real segment as an orphan
    assert real.is_dir()
    result = extract(extract_config())
    assert not result.cache_hit and result.shards_run == 1
    assert [p.name.split("-")[3] for p in (store / "manifests").glob(".probecache-broken-part-*")] == ["00002"]
    assert_same_store(store, reference, 30)


@pytest.mark.parametrize("damage", ["segment deleted", "hidden chunk deleted", "mean chunk truncated"])
def test_a_rerun_repairs_a_part_whose_segment_is_missing_or_incomplete(assert_same_store,
                                                                       damage, store, extract_config, tmp_path):
    reference = _reference_copy(store, tmp_path)
    segment = _segment(store, 2)
    if damage == "segment deleted":
        shutil.rmtree(segment)
    elif damage == "hidden chunk deleted":
        next(p for p in (segment / "hidden" / "c").rglob("*") if p.is_file()).unlink()
    else:
        chunk = next(p for p in (segment / "mean" / "c").rglob("*") if p.is_file())
        with open(chunk, "r+b") as f:
            f.truncate(chunk.stat().st_size - 3)
    report = verify_store(store)
    assert not report.ok and any("rerun the extract command" in n and "(2)" in n for n in report.notes), report.notes
    cli = runner.invoke(app, ["store", "verify", str(store)])
    assert cli.exit_code == 1 and "rerun the extract command" in cli.stdout
    result = extract(extract_config())  # this said "already extracted"
    assert not result.cache_hit and result.shards_run == 1
    (moved,) = (store / "manifests").glob(".probecache-broken-part-00002-*.parquet")
    assert pq.read_table(moved)["segment"][0].as_py() == segment.name  # the old record, kept for inspection
    assert any("set aside" in n for n in verify_store(store).notes)
    assert_same_store(store, reference, 30)
    removed = {r.kind for r in gc_store(store, older_than_seconds=0).removed}
    assert "broken-part" in removed and not moved.exists() and verify_store(store).notes == []
    assert extract(extract_config()).cache_hit


def test_gc_touches_only_names_it_created(store):
    junk = {
        ".tmp-notes": "file", "manifests/.tmp-mine.parquet": "file",
        f"manifests/.tmp-part-00001.parquet-{'d' * 32}": "file",  # an old temp name, but not a part: not provably ours
        "segments/.deleting-mystuff": "dir", "segments/.deleting-shard-1-x": "dir",
        "segments/shard-00001-20200101T000000-0123abcdX": "dir", "segments/shard-1-20200101T000000-0123abcd": "dir",
        "segments/shard-00001-20201399T000000-0123abcd": "dir",
        "segments/shard-00001-20200101T000000-0123abcd\n": "dir",
        "stats/notes.json": "file", "leases/mine.json": "file", ".probecache-tmp-short": "file",
    }
    for rel, kind in junk.items():
        path = store / rel
        path.parent.mkdir(exist_ok=True)
        if kind == "dir":
            path.mkdir()
            (path / "data.bin").write_bytes(b"user data")
        else:
            path.write_bytes(b"user data")
    provable = store / "manifests" / f".tmp-part-00001.parquet-{'e' * 32}"  # an old commit temp file: a part of shard 1
    shutil.copy(_part(store, 1), provable)
    _age_tree(store, 30 * DAY)
    report = gc_store(store, older_than_seconds=0)
    assert [(r.kind, r.path) for r in report.removed] == [("temp", f"manifests/{provable.name}")]
    assert all((store / rel).exists() for rel in junk)
    assert verify_store(store).ok


def test_gc_never_follows_a_symlinked_segment(store, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.bin").write_bytes(b"not a segment")
    for name in ("shard-00009-20200101T000000-0badf00d", ".probecache-deleting-shard-00008-20200101T000000-0badf00d",
                 ".deleting-shard-00007-20200101T000000-0badf00d"):
        (store / "segments" / name).symlink_to(outside, target_is_directory=True)
    for _ in range(2):  # this used to crash every later gc with a traceback
        report = gc_store(store, older_than_seconds=0)
        assert report.removed == [] and len(report.skipped) == 3 and "symbolic link" in report.skipped[0]
    assert (outside / "keep.bin").read_bytes() == b"not a segment"
    result = runner.invoke(app, ["store", "gc", str(store), "--older-than", "0"])
    assert result.exit_code == 0 and result.stdout.count("skipped segments/") == 3
    assert any("symbolic links" in n for n in verify_store(store).notes)


def test_gc_refuses_a_folder_that_is_not_this_store(store, tmp_path, one_line_error):
    renamed = tmp_path / "elsewhere" / "my-copy"
    shutil.copytree(store, renamed)
    _fake_segment(renamed)
    with pytest.raises(StoreError, match="names store .* but the folder is 'my-copy'"):
        gc_store(renamed, older_than_seconds=0)
    one_line_error(runner.invoke(app, ["store", "gc", str(renamed), "--older-than", "0"]), "rename it back")
    # a folder whose store.json only looks like a store's (the old test was "has plan.n_shards")
    foreign = tmp_path / "foreign"
    (foreign / "segments" / "shard-00000-20200101T000000-0badf00d").mkdir(parents=True)
    (foreign / "store.json").write_text(json.dumps({"plan": {"n_shards": 1}}))
    with pytest.raises(StoreError):
        gc_store(foreign, older_than_seconds=0)
    assert (foreign / "segments" / "shard-00000-20200101T000000-0badf00d").is_dir()


def test_verify_quick_mode_checks_sizes_not_bytes(store):
    chunk = next(p for p in (_segment(store, 1) / "hidden" / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    quick = verify_store(store, checksums=False)
    assert quick.ok and quick.bytes_checked == 0 and quick.files_checked > 0  # a flipped bit needs the full verify
    assert not verify_store(store).ok
    chunk.write_bytes(bytes(data[:-1]))
    assert any("truncated" in p for p in verify_store(store, checksums=False).problems)


def test_status_reads_leases_a_live_holder_is_running_a_dead_one_stale(store):
    from probecache.store.lease import LeaseKeeper
    from probecache.store.roots import LocalRoot

    segment = _segment(store, 2)
    _part(store, 2).unlink()  # shard 2 uncommitted; its attempt's folder is fresh (just written)
    keeper = LeaseKeeper(LocalRoot(store))
    keeper.hold(segment.name)
    try:
        assert [s["shard_id"] for s in store_status(store, stale_after=0)["shards"]["in_progress"]] == [2]
    finally:
        keeper.close()
    _write_lease(store, segment.name, time.time(), holder={**_holder_of_a_dead_process()})
    assert [s["shard_id"] for s in store_status(store)["shards"]["stale"]] == [2]  # killed: no need to wait 6h


def _holder_of_a_dead_process() -> dict:
    from probecache.store import lease

    holder = lease.holder()
    return {**holder, "pid": _dead_pid()}


@pytest.mark.parametrize("fixer", ["gc", "extract"])
@pytest.mark.parametrize("prefix", [".probecache-deleting-", ".deleting-"])
def test_a_committed_segment_left_half_deleted_by_a_killed_gc_is_put_back(assert_same_store,
                                                                          prefix, fixer, store, extract_config,
                                                                          tmp_path):
    """A gc killed between its rename and its second look, while a writer committed that very segment."""
    reference = _reference_copy(store, tmp_path)
    segment = _segment(store, 1)
    segment.rename(segment.with_name(prefix + segment.name))
    assert any(f"segments/{segment.name} is missing" in p for p in _problems(store))
    if fixer == "gc":
        assert gc_store(store, older_than_seconds=0).restored == [f"segments/{segment.name}"]
    else:
        assert extract(extract_config()).cache_hit  # put back, not extracted again
    assert segment.is_dir()
    assert_same_store(store, reference, 30)
