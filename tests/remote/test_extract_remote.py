"""`extract --root s3://...`: content-addressed reuse, shards contributed by a second user, two concurrent
extractors on one store, and a server restart in the middle of an extraction."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch
from probecache.extract.config import ExtractConfig
from probecache.extract.launchers import LaunchConfig
from probecache.extract.run import extract
from probecache.store.gc import gc_store
from probecache.store.reader import open_store
from probecache.store.roots import open_root
from probecache.store.transfer import committed_parts
from probecache.store.verify import verify_store

from .test_transfer import assert_same_data

REGION = "us-east-1"  # the S3 test server's region (tests/conftest.py)

pytestmark = pytest.mark.usefixtures("one_thread")
N_SHARDS = 8  # 60 examples in shards of 8


def config(model: Path, data: Path, root: str, **overrides) -> ExtractConfig:
    """The options of tiny_remote_source (same identity, same store id), extracted to ``root``."""
    base = dict(dataset=f"csv:{data}", model=str(model), root=root, dtype="bf16", device="cpu", shard_size=8,
                batch_tokens=256, progress=False)
    return ExtractConfig(**{**base, **overrides})


def cli_args(model: Path, data: Path, root: str) -> list[str]:
    return [sys.executable, "-m", "probecache", "extract", "--dataset", f"csv:{data}", "--model", str(model),
            "--root", root, "--dtype", "bf16", "--device", "cpu", "--shard-size", "8", "--batch-tokens", "256"]


def check_complete(url: str, reference) -> None:
    """Every shard committed exactly once, verify clean, values identical to a local extraction."""
    assert sorted(committed_parts(open_root(url))) == list(range(N_SHARDS))
    report = verify_store(url)
    assert report.ok, report.problems
    store = open_store(url)
    ids = store.manifest(columns=["example_id"])["example_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 60
    assert_same_data(reference, store)


def test_extract_to_s3_then_reuse(tiny_model, sentiment_csv, tiny_remote_source, s3_env):
    result = extract(config(tiny_model, sentiment_csv, s3_env.root))
    url = f"{s3_env.root}/{tiny_remote_source.store_id}"
    assert result.store_url == url and result.store_id == tiny_remote_source.store_id  # same content address
    assert result.shards_run == N_SHARDS and not result.cache_hit
    check_complete(url, tiny_remote_source)
    staging = result.store_path
    assert not list((staging / "segments").iterdir()) and not list((staging / "manifests").glob("part-*"))

    s3_env.monkeypatch.setenv("PROBECACHE_CACHE", str(s3_env.cache.parent / "second-user"))
    again = extract(config(tiny_model, sentiment_csv, s3_env.root))
    assert again.cache_hit and again.shards_run == 0 and again.store_url == url


def test_second_user_contributes_only_missing_shards(tiny_model, sentiment_csv, tiny_remote_source, s3_env):
    first = extract(config(tiny_model, sentiment_csv, s3_env.root), LaunchConfig(task_index=0, num_tasks=2))
    assert first.shards_run == N_SHARDS // 2
    url = first.store_url
    assert sorted(committed_parts(open_root(url))) == [0, 2, 4, 6]
    assert open_store(url).summary()["n_examples"] == 32  # a valid, partial store
    s3_env.monkeypatch.setenv("PROBECACHE_CACHE", str(s3_env.cache.parent / "second-user"))
    second = extract(config(tiny_model, sentiment_csv, s3_env.root))
    assert second.shards_run == N_SHARDS // 2 and not second.cache_hit
    check_complete(url, tiny_remote_source)


def test_read_only_keys_cannot_extract(tiny_model, sentiment_csv, s3_env):
    env = s3_env.subprocess_env("reader")
    out = subprocess.run([*cli_args(tiny_model, sentiment_csv, s3_env.root), "--no-progress"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "access denied" in err, out.stderr
    for secret in s3_env.server.reader:
        assert secret not in out.stderr + out.stdout


def test_two_concurrent_extractors(tiny_model, sentiment_csv, tiny_remote_source, s3_env, tmp_path):
    procs = []
    for user in ("alice", "bob"):  # two machines: separate caches (staging), one store
        # each pauses before committing its first shard, so both are inside shard 0 (and 1) at once and
        # race for the same commits, whatever the difference in their start-up times (< 8 s)
        env = s3_env.subprocess_env(PROBECACHE_CACHE=str(tmp_path / user), PROBECACHE_PAUSE_AT="stats-written:8")
        procs.append(subprocess.Popen(cli_args(tiny_model, sentiment_csv, s3_env.root), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    url = f"{s3_env.root}/{tiny_remote_source.store_id}"
    won = lost = 0
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert out.strip().splitlines()[-1] == f"store: {url}"
        # "uploaded N shards to URL (..., M committed by another extractor first)": N = commits this one won
        won += sum(int(m) for m in re.findall(r"^uploaded (\d+) shards to ", err, re.MULTILINE))
        lost += sum(int(m) for m in re.findall(r"(\d+) committed by another extractor first", err))
    assert won == N_SHARDS and lost >= 1  # each shard committed once; the races really happened
    check_complete(url, tiny_remote_source)
    assert any("orphan segments" in n for n in verify_store(url).notes)  # the losers' uploads
    assert sum(r.kind == "segment" for r in gc_store(url, 0).removed) == lost  # (and their stats)
    check_complete(url, tiny_remote_source)


def test_server_restart_in_the_middle_of_an_extraction(tiny_model, sentiment_csv, tiny_remote_source,
                                                       restartable_s3, tmp_path, monkeypatch):
    server = restartable_s3
    creds = {"AWS_ACCESS_KEY_ID": "restart-key", "AWS_SECRET_ACCESS_KEY": "restart-secret",
             "AWS_ENDPOINT_URL": server.endpoint, "AWS_REGION": REGION}
    boto3.client("s3", endpoint_url=server.endpoint, region_name=REGION, aws_access_key_id="k",
                 aws_secret_access_key="s").create_bucket(Bucket="restart-bucket")
    for name, value in creds.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PROBECACHE_CACHE", str(tmp_path / "reader-cache"))
    root = "s3://restart-bucket/team"
    env = {**os.environ, **creds, "PROBECACHE_CACHE": str(tmp_path / "cache"),
           "PROBECACHE_REMOTE_RETRY_SECONDS": "2"}
    # the writer thread pauses after the first commit: the server is killed while shard 1 is on its way
    run = subprocess.Popen([*cli_args(tiny_model, sentiment_csv, root), "--no-progress"],
                           env={**env, "PROBECACHE_PAUSE_AT": "shard-committed:4"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"{root}/{tiny_remote_source.store_id}"
    deadline = time.time() + 300
    while not committed_parts_or_none(url) and time.time() < deadline and run.poll() is None:
        time.sleep(0.1)
    assert committed_parts_or_none(url), "no shard reached the server"
    server.kill()
    out, err = run.communicate(timeout=300)
    assert run.returncode == 2, err  # a one-line error, not a hang and not a traceback
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "rerun" in last and "restart-secret" not in err, err
    # what was committed locally but could not be uploaded waits in staging for the rerun
    left = list((tmp_path / "cache" / "staging").glob("*/*/manifests/part-*.parquet"))
    assert left, "expected a shard committed in staging but not uploaded"

    server.start()  # the same data, as a real object store after a restart
    done = subprocess.run([*cli_args(tiny_model, sentiment_csv, root), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"store: {url}"
    assert not list((tmp_path / "cache" / "staging").glob("*/*/manifests/part-*.parquet"))
    check_complete(url, tiny_remote_source)
    again = open_store(url)
    assert torch.equal(again.mean(), tiny_remote_source.mean())


def committed_parts_or_none(url: str) -> dict | None:
    try:
        return committed_parts(open_root(url)) or None
    except Exception:  # the server is still starting
        return None


def test_shards_left_in_staging_are_uploaded_and_damaged_ones_extracted_again(tiny_model, sentiment_csv,
                                                                              tiny_remote_source, s3_env):
    from probecache.manifests.schema import part_stats
    from probecache.store.remote import staging_root

    # what a run killed after committing locally (and before uploading) leaves: a whole store in staging
    staged = extract(config(tiny_model, sentiment_csv, str(staging_root(s3_env.root)))).store_path
    segment = staged / "segments" / part_stats(staged / "manifests" / "part-00003.parquet")["segment"]
    (segment / "mean" / "c" / "0" / "0" / "0").unlink()  # and one shard lost a file on the way
    result = extract(config(tiny_model, sentiment_csv, s3_env.root))
    assert result.shards_run == 1  # only the damaged shard was computed again; 7 were uploaded as they were
    check_complete(result.store_url, tiny_remote_source)
    assert not list((staged / "manifests").glob("part-*"))


def test_slurm_scripts_pass_url_roots_through():
    from probecache.extract.launchers import cli_args

    args = cli_args(ExtractConfig(root="s3://team-bucket/probecache"))
    assert args[args.index("--root") + 1] == "s3://team-bucket/probecache"
