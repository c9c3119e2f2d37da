"""`store convert` (store/convert.py): a converted store is the store `extract --tier` writes directly (same id,
every value torch.equal), verifies clean, reruns as a no-op, resumes after kill -9, and refuses what would lie."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from probecache.store import convert as convert_module
from probecache.store.convert import convert_store
from probecache.store.errors import StoreError
from probecache.store.reader import open_store
from probecache.store.verify import verify_store
from typer.testing import CliRunner

from probecache.cli import app

runner = CliRunner()
OPTIONS = dict(shard_size=48, logits=True, store_token_ids=True, store_text=True)  # 2 shards, shard 0 > 1024 tokens
TIERS = ["int7", "mantissa-4", "fp8-e4m3"]


@pytest.fixture(scope="module")
def stores(tiny_model, sentiment_csv, extract_tiny_store, tmp_path_factory):
    """The lossless store and, per tier, the store extracted directly at that tier (same options)."""
    root = tmp_path_factory.mktemp("convert")
    out = {"lossless": extract_tiny_store(tiny_model, root / "src", sentiment_csv, **OPTIONS)}
    for tier in TIERS:
        out[tier] = extract_tiny_store(tiny_model, root / "direct", sentiment_csv, tier=tier, **OPTIONS)
    out["subset"] = extract_tiny_store(tiny_model, root / "direct", sentiment_csv, tier="mantissa-4", layers="0,2",
                                       tokens="every-3", **OPTIONS)
    return out


def assert_equal_stores(converted, direct) -> None:
    """Same id, same manifest rows (segment names aside), every array torch.equal, verify clean."""
    assert converted.store_id == direct.store_id
    assert converted.info["identity"] == direct.info["identity"] and converted.tier == direct.tier
    report = verify_store(converted.path)
    assert report.ok, report.problems
    rows = [{k: v for k, v in r.items() if k != "segment"} for r in converted.manifest().to_pylist()]
    assert rows == [{k: v for k, v in r.items() if k != "segment"} for r in direct.manifest().to_pylist()]
    assert converted.segments() != direct.segments()  # new attempts: the check below compares values, not files
    for a, b in zip(converted.segments(), direct.segments(), strict=True):
        assert torch.equal(converted.read_tokens(a), direct.read_tokens(b))
        assert (converted.read_tokens(a, decode=False) == direct.read_tokens(b, decode=False)).all()
    ids = direct.manifest(columns=["example_id"])["example_id"].to_pylist()
    for eid in ids:
        assert torch.equal(converted.hidden(eid), direct.hidden(eid)), eid
        assert torch.equal(converted.token_ids(eid), direct.token_ids(eid)), eid
    assert torch.equal(converted.mean(), direct.mean())
    assert torch.equal(converted.last(), direct.last())
    assert torch.equal(converted.logits(), direct.logits())


@pytest.mark.parametrize("tier", TIERS)
def test_converted_store_is_the_directly_extracted_one(stores, tier, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "READ_TOKENS", 64)  # many read windows: examples straddle their edges
    seen = []
    path = convert_store(stores["lossless"].path, tmp_path, tier, progress=lambda s, done: seen.append((s, done)))
    assert seen == [(0, True), (1, True)]
    converted = open_store(path)
    assert_equal_stores(converted, stores[tier])
    assert converted.info["provenance"]["converted_from"] == stores["lossless"].store_id
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    seen.clear()
    assert convert_store(stores["lossless"].path, tmp_path, tier, progress=lambda s, d: seen.append((s, d))) == path
    assert seen == [(0, False), (1, False)]  # rerun: nothing converted, nothing written
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before


def _cli(args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PROBECACHE_CRASH_AT"}
    if crash_at:
        env["PROBECACHE_CRASH_AT"] = crash_at
    exe = str(Path(sys.executable).parent / "probecache")
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("point", ["header-written", "writer-append:30", "segment-closed:2", "stats-written"])
def test_kill_mid_convert_then_rerun_gives_the_uninterrupted_store(stores, point, tmp_path):
    args = ["store", "convert", str(stores["lossless"].path), "--tier", "int7", "--root", str(tmp_path)]
    killed = _cli(args, point)
    assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    rerun = _cli(args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    path = Path(rerun.stdout.strip().splitlines()[-1].removeprefix("store: "))
    assert_equal_stores(open_store(path), stores["int7"])


def test_lossy_source_and_partial_source_are_refused_in_one_line(stores, one_line_error, tmp_path):
    result = runner.invoke(app, ["store", "convert", str(stores["int7"].path), "--tier", "lossless",
                                 "--root", str(tmp_path)])
    one_line_error(result, "int7", "lossy", "convert from the lossless store")
    result = runner.invoke(app, ["store", "convert", str(stores["lossless"].path), "--tier", "int9"])
    one_line_error(result, "unknown value tier")
    partial = tmp_path / "partial"  # an incomplete lossless source: the same store with its last part removed
    shutil.copytree(stores["lossless"].path, partial / stores["lossless"].store_id)
    (partial / stores["lossless"].store_id / "manifests" / "part-00001.parquet").unlink()
    source = partial / stores["lossless"].store_id
    result = runner.invoke(app, ["store", "convert", str(source), "--tier", "int7", "--root", str(tmp_path / "p")])
    one_line_error(result, "1/2 shards committed", "--partial")
    path = convert_store(source, tmp_path / "p", "int7", partial=True)
    assert open_store(path).layout.committed_shards() == {0}
    with pytest.raises(StoreError, match="nothing to convert"):
        convert_store(stores["lossless"].path, stores["lossless"].path.parent, "lossless")


def test_a_layer_and_token_subset_converts_to_the_directly_extracted_store(stores, tmp_path, one_line_error):
    """--layers and --tokens (with a tier): the store `extract --tier mantissa-4 --layers 0,2 --tokens every-3`
    writes, from the lossless store, without the model; the CLI says how to fix what it cannot do."""
    result = runner.invoke(app, ["store", "convert", str(stores["lossless"].path), "--tier", "mantissa-4",
                                 "--layers", "0,2", "--tokens", "every-3", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    converted = open_store(result.stdout.strip().rsplit("store: ", 1)[1])
    assert_equal_stores(converted, stores["subset"])
    # a subset of a subset: layers it holds are fine, layers it lacks and re-cutting its tokens are refused
    one_line_error(runner.invoke(app, ["store", "convert", str(converted.path), "--layers", "1"]),
                   "holds layers 0,2 only")
    one_line_error(runner.invoke(app, ["store", "convert", str(converted.path), "--tokens", "last"]),
                   "keeps --tokens every-3")
