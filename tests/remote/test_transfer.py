"""`store push` / `store pull`: verified, resumable copies that are valid stores at every moment."""

from __future__ import annotations

import json

import pytest
import torch
from probecache.manifests.schema import part_stats
from probecache.store.errors import StoreError
from probecache.store.reader import open_store
from probecache.store.roots import ObjectRoot, open_root
from probecache.store.transfer import committed_parts, pull, push
from probecache.store.verify import verify_store


def assert_same_data(a, b) -> None:
    ids = a.manifest(columns=["example_id"])["example_id"].to_pylist()
    assert ids == b.manifest(columns=["example_id"])["example_id"].to_pylist()
    for eid in ids:
        assert torch.equal(a.hidden(eid), b.hidden(eid))
    assert torch.equal(a.mean(ids), b.mean(ids)) and torch.equal(a.last(ids), b.last(ids))


def test_push_then_pull_round_trip(tiny_remote_source, s3_env, tmp_path):
    src = tiny_remote_source
    report = push(str(src.path), s3_env.root)
    url = f"{s3_env.root}/{src.store_id}"
    assert report.destination == url
    assert sorted(report.shards_copied) == list(range(8)) and report.files_copied > 0
    again = push(str(src.path), s3_env.root)  # nothing missing: nothing copied
    assert again.shards_copied == [] and again.shards_present == 8 and again.bytes_copied == 0

    pulled = pull(url, str(tmp_path / "mine"))
    local = tmp_path / "mine" / src.store_id
    assert pulled.destination == str(local) and sorted(pulled.shards_copied) == list(range(8))
    assert verify_store(local).ok
    assert_same_data(src, open_store(local))
    assert pull(url, str(local)).shards_copied == []  # LOCAL may name the store folder itself


def test_pull_resumes_and_repairs_only_what_is_missing(tiny_remote_source, s3_env, tmp_path):
    src = tiny_remote_source
    push(str(src.path), s3_env.root)
    url = f"{s3_env.root}/{src.store_id}"
    pull(url, str(tmp_path))
    local = tmp_path / src.store_id
    # an interrupted pull: shard 3's part never written, one of shard 5's files lost, one of shard 6's corrupted
    (local / "manifests" / "part-00003.parquet").unlink()
    seg5 = local / "segments" / part_stats(local / "manifests" / "part-00005.parquet")["segment"]
    (seg5 / "mean" / "c" / "0" / "0" / "0").unlink()
    (local / "manifests" / "part-00005.parquet").unlink()
    seg6 = local / "segments" / part_stats(local / "manifests" / "part-00006.parquet")["segment"]
    victim = seg6 / "hidden" / "c" / "0" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    (local / "manifests" / "part-00006.parquet").unlink()
    report = pull(url, str(tmp_path))
    assert sorted(report.shards_copied) == [3, 5, 6]
    assert report.files_copied == 2  # the lost file and the corrupted one; shard 3's files were all there
    assert verify_store(local).ok
    assert_same_data(src, open_store(local))


def test_interrupted_push_leaves_a_valid_store_and_resumes(tiny_remote_source, s3_env, monkeypatch):
    src = tiny_remote_source
    url = f"{s3_env.root}/{src.store_id}"
    real_put, calls = ObjectRoot.put, [0]

    def flaky_put(self, rel, data):
        calls[0] += 1
        if calls[0] == 40:
            raise StoreError("connection reset (simulated)")
        return real_put(self, rel, data)

    monkeypatch.setattr(ObjectRoot, "put", flaky_put)
    with pytest.raises(StoreError, match="simulated"):
        push(str(src.path), s3_env.root)
    monkeypatch.setattr(ObjectRoot, "put", real_put)
    remote = open_store(url)  # a valid store: whole committed shards only
    committed = committed_parts(open_root(url))
    assert 0 < len(committed) < 8
    ids = remote.manifest(columns=["example_id"])["example_id"].to_pylist()
    rows = src.manifest(columns=["example_id", "shard_id"]).to_pylist()
    assert ids == [r["example_id"] for r in rows if r["shard_id"] in committed]
    for eid in ids:
        assert torch.equal(remote.hidden(eid), src.hidden(eid))
    report = push(str(src.path), s3_env.root)
    assert sorted(report.shards_copied) == sorted(set(range(8)) - set(committed))
    assert report.files_present > 0  # the files uploaded before the interruption were not sent again
    assert_same_data(src, open_store(url))


def test_pull_refuses_corrupted_remote_files(tiny_remote_source, s3_env, tmp_path):
    src = tiny_remote_source
    push(str(src.path), s3_env.root)
    url = f"{s3_env.root}/{src.store_id}"
    root = open_root(url)
    segment = part_stats(src.path / "manifests" / "part-00002.parquet")["segment"]
    key = f"segments/{segment}/hidden/c/0/0/0"
    data = bytearray(root.get(key))
    data[7] ^= 1
    root.put(key, bytes(data))
    with pytest.raises(StoreError, match="crc32c .* recorded"):
        pull(url, str(tmp_path))
    local = tmp_path / src.store_id
    assert not (local / "manifests" / "part-00002.parquet").exists()  # never committed with bad bytes
    assert verify_store(local).ok


def test_hostile_manifest_cannot_write_outside_the_store(tiny_remote_source, s3_env, tmp_path):
    import pyarrow.parquet as pq

    src = tiny_remote_source
    push(str(src.path), s3_env.root)
    url = f"{s3_env.root}/{src.store_id}"
    from probecache.manifests.schema import part_bytes

    table = pq.read_table(src.path / "manifests" / "part-00001.parquet")
    stats = json.loads(table.schema.metadata[b"probecache.shard_stats"])
    stats["files"] = {"../../../../escaped.txt": [1, "00000000"], **stats["files"]}
    # a hostile part with a valid digest (a damaged one is refused earlier, by its checksum)
    hostile = part_bytes(table.to_pylist(), stats, with_text="text" in table.column_names)
    root = open_root(url)
    root.delete("manifests/part-00001.parquet")
    root.put("manifests/part-00001.parquet", hostile)
    with pytest.raises(StoreError, match="not allowed"):
        pull(url, str(tmp_path / "dst"))
    assert not list(tmp_path.rglob("escaped.txt"))


def test_push_refuses_a_different_extraction_under_the_same_name(tiny_remote_source, s3_env):
    src = tiny_remote_source
    url = f"{s3_env.root}/{src.store_id}"
    root = open_root(url)
    info = json.loads((src.path / "store.json").read_text())
    info["identity"] = {**info["identity"], "max_tokens": 1}
    root.put("store.json", json.dumps(info).encode())
    root.put("plan.parquet", (src.path / "plan.parquet").read_bytes())
    with pytest.raises(StoreError, match="different extraction"):
        push(str(src.path), url)
