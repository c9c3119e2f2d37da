"""`probecache store ls/info/verify/gc/push/pull` on s3:// URLs, as users drive them."""

from __future__ import annotations

import json

import pytest
from probecache.manifests.schema import part_stats
from probecache.store.roots import open_root
from typer.testing import CliRunner

from probecache.cli import app

runner = CliRunner()


def ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def pushed(tiny_remote_source, s3_env) -> str:
    out = ok("store", "push", str(tiny_remote_source.path), s3_env.root)
    url = f"{s3_env.root}/{tiny_remote_source.store_id}"
    assert out.strip().splitlines()[-1] == f"store: {url}"
    assert "copied 8 shards" in out
    return url


def test_ls_info_verify_pull(pushed, tiny_remote_source, s3_env, tmp_path):
    table = ok("store", "ls", s3_env.root)
    header, _, row = table.strip().splitlines()
    assert header.split() == ["store", "model", "dataset", "examples", "size", "status", "created"]
    assert row.split()[0] == tiny_remote_source.store_id and "complete" in row and " 60 " in row
    (listed,) = json.loads(ok("store", "ls", s3_env.root, "--json"))
    assert listed["path"] == pushed and listed["shards_committed"] == 8
    info = ok("store", "info", pushed)
    assert f"path  {pushed}" in info and "60 of 60 planned" in info and "8/8 committed" in info
    verify = ok("store", "verify", pushed)
    assert verify.strip().splitlines()[-1].startswith("ok: 8 parts of 8 shards")
    s3_env.use("reader")  # ls, info, verify and pull need nothing but reads
    assert "8/8 committed" in ok("store", "info", pushed)
    ok("store", "verify", pushed)
    out = ok("store", "pull", pushed, str(tmp_path))
    assert out.strip().splitlines()[-1] == f"store: {tmp_path / tiny_remote_source.store_id}"
    ok("store", "verify", str(tmp_path / tiny_remote_source.store_id))


def test_verify_names_remote_damage_and_gc_removes_orphans(pushed, tiny_remote_source, s3_env):
    root = open_root(pushed)
    seg = {s: part_stats(tiny_remote_source.path / "manifests" / f"part-{s:05d}.parquet")["segment"] for s in (1, 2, 3)}
    root.delete(f"segments/{seg[1]}/mean/c/0/0/0")
    data = bytearray(root.get(f"segments/{seg[2]}/hidden/c/0/0/0"))
    data[3] ^= 1
    root.put(f"segments/{seg[2]}/hidden/c/0/0/0", bytes(data))
    root.put(f"segments/{seg[3]}/hidden/c/0/9/0", b"stray")
    orphan = "shard-00004-20200101T000000-0123abcd"
    root.put(f"segments/{orphan}/zarr.json", b"{}")
    result = runner.invoke(app, ["store", "verify", pushed])
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert f"segments/{seg[1]}/mean/c/0/0/0: recorded file is missing" in out
    assert f"segments/{seg[2]}/hidden/c/0/0/0: crc32c" in out and "(corrupted)" in out
    assert f"segments/{seg[3]}/hidden/c/0/9/0: file is not in the commit record" in out
    assert "1 orphan segments" in out and out.strip().splitlines()[-1].startswith("FAILED: 3 problems")

    # gc deletes nothing in a store that does not verify structurally (a recorded file missing, one unrecorded);
    # the flipped bit needs the full verify (gc reads no bytes) and does not stop it
    refused = runner.invoke(app, ["store", "gc", pushed, "--older-than", "0"])
    assert refused.exit_code == 2 and "does not verify" in refused.stderr, refused.output
    assert root.get(f"segments/{orphan}/zarr.json") is not None
    source = tiny_remote_source.path / "segments" / seg[1] / "mean" / "c" / "0" / "0" / "0"
    root.put(f"segments/{seg[1]}/mean/c/0/0/0", source.read_bytes())
    root.delete(f"segments/{seg[3]}/hidden/c/0/9/0")

    # the age of a remote orphan is that of its newest object: just uploaded, it may be a live upload
    assert "kept 1 unreferenced" in ok("store", "gc", pushed)  # default age gate: 6h
    gc = ok("store", "gc", pushed, "--older-than", "0")
    assert gc.startswith("removed 1 segment") and orphan in gc
    assert root.get(f"segments/{orphan}/zarr.json") is None
    assert root.list(f"segments/{seg[3]}")  # referenced segments are never touched

def test_user_errors_are_one_line_and_hold_no_secrets(pushed, s3_env, one_line_error):
    one_line_error(runner.invoke(app, ["store", "info", s3_env.root + "/nope"]), "no store.json")
    err = one_line_error(runner.invoke(app, ["store", "info", "s3://AKIAXX:verysecret@bucket/x"]), "refused")
    assert "verysecret" not in err
    one_line_error(runner.invoke(app, ["store", "ls", "s3://bucket/../etc"]), "not allowed")
    status = runner.invoke(app, ["store", "status", pushed])  # the same status code reads a URL
    assert status.exit_code == 0 and "state      complete" in status.stdout, status.output
    s3_env.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    err = one_line_error(runner.invoke(app, ["store", "info", pushed]), "access denied")
    assert "not-the-secret-123" not in err and s3_env.server.writer[0] not in err
    s3_env.use("reader")
    one_line_error(runner.invoke(app, ["store", "push", str(pushed), s3_env.root + "/copy"]))
