"""Reading and training from a store on the S3 server with read-only credentials, through the local mirror."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from probecache.store.errors import StoreError
from probecache.store.mirror import parse_size
from probecache.store.reader import list_stores, open_store
from probecache.store.roots import REQUESTS, open_root
from probecache.store.transfer import push
from probecache.train.loaders import TokenStream, load_pooled
from typer.testing import CliRunner

from probecache.cli import app

from .test_transfer import assert_same_data

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture
def remote_url(tiny_remote_source, s3_env) -> str:
    """The tiny store pushed by the writer; the test continues with the reader's (read-only) keys."""
    push(str(tiny_remote_source.path), s3_env.root)
    s3_env.use("reader")
    return f"{s3_env.root}/{tiny_remote_source.store_id}"


def _segment_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.glob("remote/*/*/segments/*/**/*") if p.is_file())


def test_reader_api_on_a_remote_store(tiny_remote_source, remote_url, s3_env):
    store = open_store(remote_url)
    assert store.mirror is not None and store.url == store.summary()["path"] == remote_url
    assert store.summary()["complete"] and store.summary()["n_examples"] == 60
    assert_same_data(tiny_remote_source, store)
    eid = store.manifest(split="test", columns=["example_id"])["example_id"][0].as_py()
    assert torch.equal(store.hidden(eid, layers=[0, 2, 3]), tiny_remote_source.hidden(eid, layers=[0, 2, 3]))


def test_one_example_costs_a_few_whole_file_requests(tiny_remote_source, remote_url):
    store = open_store(remote_url)
    eid = store.manifest(columns=["example_id"])["example_id"][0].as_py()
    before = REQUESTS["get"]
    store.hidden(eid)
    cold = REQUESTS["get"] - before
    assert 1 <= cold <= 3  # group zarr.json, hidden/zarr.json, the zarr shard file: never one per inner chunk
    before = REQUESTS["get"]
    again = open_store(remote_url)  # a new process would do the same: the mirror is on disk
    opened = REQUESTS["get"] - before
    again.hidden(eid)
    assert REQUESTS["get"] - before == opened == 1  # store.json only; segment files come from the mirror


def test_cache_is_capped_and_checked(tiny_remote_source, remote_url, s3_env, monkeypatch):
    cap = 40_000
    monkeypatch.setenv("PROBECACHE_REMOTE_CACHE_SIZE", str(cap))
    store = open_store(remote_url)
    largest = max(sum(size for size, _ in store.segment_files(s).values())
                  for s in set(store.manifest(columns=["segment"])["segment"].to_pylist()))
    assert_same_data(tiny_remote_source, store)
    assert _segment_bytes(s3_env.cache) <= cap + largest  # whole segments evicted, LRU
    # a cached file damaged on disk is noticed (crc32c against the commit record) and fetched again
    cached = next(p for p in s3_env.cache.glob("remote/*/*/segments/*/*/c/**/*") if p.is_file())
    data = bytearray(cached.read_bytes())
    data[50] ^= 0xFF
    cached.write_bytes(bytes(data))
    assert_same_data(tiny_remote_source, open_store(remote_url))


def test_a_corrupted_remote_file_is_an_error_not_wrong_numbers(tiny_remote_source, remote_url, s3_env):
    s3_env.use("writer")
    store = open_store(remote_url)
    segment = store.manifest(columns=["segment"])["segment"][0].as_py()
    root = open_root(remote_url)
    key = f"segments/{segment}/hidden/c/0/0/0"
    data = bytearray(root.get(key))
    data[9] ^= 1
    root.put(key, bytes(data))
    eid = store.manifest(columns=["example_id"])["example_id"][0].as_py()
    with pytest.raises(StoreError, match="corrupted"):
        store.hidden(eid)


def test_loaders_and_listing_on_a_remote_root(tiny_remote_source, remote_url, s3_env):
    pooled = load_pooled(remote_url, "train", layers=[1, 3])
    local = load_pooled(tiny_remote_source, "train", layers=[1, 3])
    assert torch.equal(pooled.x, local.x) and torch.equal(pooled.y, local.y)
    stream = TokenStream(open_store(remote_url), "validation", batch_size=4, seed=0)
    assert sum(len(b.example_ids) for b in stream.epoch(0)) == 10
    (listed,) = list_stores(s3_env.root)
    assert listed["store_id"] == tiny_remote_source.store_id and listed["n_examples"] == 60
    with pytest.raises(StoreError, match="no store.json"):
        open_store(s3_env.root + "/not-a-store")


def test_train_cli_on_a_remote_store_with_read_only_keys(remote_url, s3_env, tmp_path):
    os.environ.pop("PROBECACHE_ROOT", None)
    for probe in ("scoring", "linear"):
        result = runner.invoke(app, ["train", "--store", remote_url, "--probe", probe, "--epochs", "2",
                                     "--no-progress", "--runs-dir", str(tmp_path / "runs")])
        assert result.exit_code == 0, result.output
        run = Path(result.stdout.strip().splitlines()[-1].removeprefix("run: "))
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["test"]["n"] == 10, metrics
        assert json.loads((run / "config.json").read_text())["store"]["path"] == remote_url  # the URL, not the mirror
    # a store id under --root s3://... is the same store
    store_id = remote_url.rstrip("/").rsplit("/", 1)[-1]
    result = runner.invoke(app, ["train", "--store", store_id, "--root", s3_env.root, "--probe", "scoring",
                                 "--epochs", "1", "--no-progress", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert s3_env.user == "reader"


def test_cache_sizes():
    assert parse_size("20G") == 20 << 30 and parse_size("500m") == 500 << 20 and parse_size(123) == 123
    with pytest.raises(StoreError):
        parse_size("lots")
