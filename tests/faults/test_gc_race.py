"""gc racing a real extraction (issue 15): `store gc --older-than 0` run in a loop while `probecache extract`
writes long texts in shards of 8, then the store must verify clean, hold every example exactly once, and every
value must equal an undisturbed run's. Before leases, the first gc that saw a shard in flight deleted it.

Bounded: the loop lasts as long as the (small) extraction, a one-time pause inside the first shard guarantees
that gc runs while a segment is being written, and no assertion depends on how long anything took."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from probecache.store.errors import StoreError
from probecache.store.gc import gc_store
from probecache.store.verify import verify_store

from probecache import open_store

WORDS = "the film was long and the plot kept turning on itself while the cast did what they could".split()


def _long_texts(path: Path, n: int = 24) -> Path:
    """``n`` labelled texts of 200-520 characters (byte-level tokens: a few zarr shards per segment)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i in range(n):
            words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40 + (i % 5) * 15)]
            w.writerow([f"t{i:02d}", " ".join(words), "pos" if i % 2 else "neg"])
    return path


def _args(model: Path, data: Path, root: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "probecache"), "extract", "--dataset", f"csv:{data}", "--model",
            str(model), "--root", str(root), "--dtype", "fp32", "--shard-size", "8", "--batch-tokens", "1024",
            "--no-progress"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROBECACHE_")}
    return {**env, **extra}


def test_gc_in_a_loop_during_a_real_extract_loses_nothing(tiny_model, tmp_path):
    data = _long_texts(tmp_path / "long.csv")
    reference_root, root = tmp_path / "reference", tmp_path / "racing"
    done = subprocess.run(_args(tiny_model, data, reference_root), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (reference,) = reference_root.iterdir()

    # one 2 s pause inside the first shard (writer thread, after its 3rd example): a segment surely in flight
    proc = subprocess.Popen(_args(tiny_model, data, root), env=_env(PROBECACHE_PAUSE_AT="writer-append:2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reports, refusals = [], []
    try:
        while proc.poll() is None:
            stores = [p.parent for p in root.glob("*/store.json")]
            if stores:
                try:
                    reports.append(gc_store(stores[0], older_than_seconds=0))
                except StoreError as e:  # a store gc cannot trust at some moment: it deleted nothing
                    refusals.append(str(e))
            time.sleep(0.05)  # a tight loop, but leave the 2 cores mostly to the extraction
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert refusals == []  # a running extraction always verifies structurally
    leased = [k for r in reports for k in r.kept if (k.reason or "").startswith("lease")]
    assert leased, f"{len(reports)} gc runs never met a segment in flight"  # the race really happened
    assert not [r for report in reports for r in report.removed if r.kind in ("segment", "deleting")]

    (store,) = root.iterdir()
    after = gc_store(store, older_than_seconds=0)  # the extraction is over: nothing is leased any more
    assert after.kept == [] and not [p for p in (store / "leases").iterdir()]
    report = verify_store(store)
    assert report.ok and report.notes == [], (report.problems, report.notes)
    got, want = open_store(store), open_store(reference)
    ids = got.manifest(columns=["example_id"])["example_id"].to_pylist()
    expected = want.manifest(columns=["example_id"])["example_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(expected) == 24 and sorted(ids) == sorted(expected)
    for eid in expected:
        assert torch.equal(got.hidden(eid), want.hidden(eid)), eid
    assert torch.equal(got.mean(expected), want.mean(expected))
    assert torch.equal(got.last(expected), want.last(expected))
