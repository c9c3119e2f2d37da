"""`store gc` on object storage against a real S3 server (issue 15): leases keep live uploads, a store that does
not verify is refused, an upload re-sends what vanished before its commit, and rerunning extract repairs a
part whose segment is gone."""

from __future__ import annotations

import json
import time

import pytest
import torch
from probecache.manifests.schema import part_stats
from probecache.store.errors import StoreError
from probecache.store.gc import gc_store
from probecache.store.lease import LEASE_TTL_SECONDS, LeaseKeeper, lease_key
from probecache.store.reader import open_store
from probecache.store.remote import parse_url
from probecache.store.roots import LocalRoot, ObjectRoot, open_root
from probecache.store.transfer import TransferReport, copy_header, copy_shard, push
from probecache.store.verify import verify_store

ORPHAN = "shard-00001-20200101T000000-0badf00d"


@pytest.fixture
def pushed(tiny_remote_source, s3_env) -> str:
    push(str(tiny_remote_source.path), s3_env.root)
    return f"{s3_env.root}/{tiny_remote_source.store_id}"


def _segment(source, shard: int) -> str:
    return part_stats(source.path / "manifests" / f"part-{shard:05d}.parquet")["segment"]


def _upload_orphan(root, source) -> None:
    """An orphan at the remote: shard 1's files under another attempt name (an upload that lost or died)."""
    folder = source.path / "segments" / _segment(source, 1)
    for path in folder.rglob("*"):
        if path.is_file():
            root.put(f"segments/{ORPHAN}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def test_remote_gc_never_deletes_a_leased_upload(pushed, tiny_remote_source):
    root = open_root(pushed)
    _upload_orphan(root, tiny_remote_source)
    keeper = LeaseKeeper(root)
    keeper.hold(ORPHAN)  # this process is uploading it: alive, whatever the clock and --older-than say
    try:
        for now in (None, time.time() + 30 * 86400):
            report = gc_store(pushed, 0, now=now)
            assert report.removed == [] and [k.reason.split(":")[0] for k in report.kept] == ["lease"]
        assert root.list(f"segments/{ORPHAN}")
    finally:
        keeper.close()  # the upload is over (the lease object is deleted)
    assert root.get(lease_key(ORPHAN)) is None
    report = gc_store(pushed, 0)
    assert [r.path for r in report.removed] == [f"segments/{ORPHAN}"] and not root.list(f"segments/{ORPHAN}")
    assert verify_store(pushed).ok


def test_a_remote_lease_from_another_machine_expires_after_its_ttl(pushed, tiny_remote_source):
    root = open_root(pushed)
    _upload_orphan(root, tiny_remote_source)
    root.put(lease_key(ORPHAN), json.dumps({"segment": ORPHAN, "heartbeat": time.time(), "holder": {
        "host": "elsewhere", "pid": 1, "boot_id": "another-machine", "pid_ns": "pid:[1]", "start": "1"}}).encode())
    assert gc_store(pushed, 0).removed == []
    report = gc_store(pushed, 0, now=time.time() + LEASE_TTL_SECONDS + 60)
    assert [(r.kind, r.path) for r in report.removed] == [("segment", f"segments/{ORPHAN}"),
                                                          ("lease", lease_key(ORPHAN))]  # as on a local disk
    assert not root.list(f"segments/{ORPHAN}") and root.get(lease_key(ORPHAN)) is None


def test_remote_gc_refuses_a_store_that_does_not_verify(pushed, tiny_remote_source, s3_env):
    root = open_root(pushed)
    _upload_orphan(root, tiny_remote_source)
    gone = _segment(tiny_remote_source, 2)
    for rel in root.list(f"segments/{gone}"):
        root.delete(f"segments/{gone}/{rel}")
    with pytest.raises(StoreError, match="does not verify, so gc deletes nothing"):
        gc_store(pushed, 0)
    assert root.list(f"segments/{ORPHAN}")
    report = verify_store(pushed)
    assert any("rerun the extract command" in n and "(2)" in n for n in report.notes), report.notes
    # a store folder under another name than its store id is not gc's to clean
    renamed = f"{s3_env.root}/renamed"
    copy_root = open_root(renamed)
    for key in root.list("manifests"):
        copy_root.put(f"manifests/{key}", root.get(f"manifests/{key}"))
    for name in ("store.json", "plan.parquet"):
        copy_root.put(name, root.get(name))
    with pytest.raises(StoreError, match="but the folder is 'renamed'"):
        gc_store(renamed, 0)


class _VanishingOnce:
    """A destination where the first check after an upload finds one object deleted (a gc that ignored the
    lease, a lifecycle rule): copy_shard must send it again before committing."""

    def __init__(self, root):
        self.root, self.url, self.deleted, self.uploaded = root, root.url, [], False

    def __getattr__(self, name):
        return getattr(self.root, name)

    def put(self, rel: str, data: bytes) -> None:
        self.uploaded |= rel.startswith("segments/")
        self.root.put(rel, data)

    def list(self, rel: str = ""):
        if rel.startswith("segments/") and self.uploaded and not self.deleted:
            self.deleted.append(f"{rel}/zarr.json")
            self.root.delete(self.deleted[0])
        return self.root.list(rel)


def test_an_upload_sends_again_what_vanished_before_its_commit(tiny_remote_source, s3_env):
    src = LocalRoot(tiny_remote_source.path)
    url = f"{s3_env.root}/{tiny_remote_source.store_id}"
    real = ObjectRoot(parse_url(url))
    dst = _VanishingOnce(real)
    copy_header(src, real)
    report = TransferReport(src.url, url, tiny_remote_source.store_id)
    assert copy_shard(src, dst, 0, report)
    assert dst.deleted and real.get(dst.deleted[0]) is not None  # it was sent again, then committed
    files = part_stats(tiny_remote_source.path / "manifests" / "part-00000.parquet")["files"]
    assert report.files_copied == len(files) + 1 and real.get(lease_key(_segment(tiny_remote_source, 0))) is None
    verified = verify_store(url)
    assert verified.ok and verified.parts_checked == 1, verified.problems


def test_rerunning_extract_repairs_a_remote_part_whose_segment_is_gone(pushed, tiny_remote_source, tiny_model,
                                                                       sentiment_csv, s3_env, capfd):
    from probecache.extract.config import ExtractConfig
    from probecache.extract.run import extract

    root = open_root(pushed)
    gone = _segment(tiny_remote_source, 3)
    for rel in root.list(f"segments/{gone}"):
        root.delete(f"segments/{gone}/{rel}")
    assert not verify_store(pushed).ok
    # the same extraction as the pushed store (tests/conftest.py extract_tiny_store), into the bucket
    config = ExtractConfig(dataset=f"csv:{sentiment_csv}", model=str(tiny_model), root=s3_env.root, dtype="bf16",
                           device="cpu", shard_size=8, batch_tokens=256, progress=False)
    result = extract(config)
    assert not result.cache_hit and result.shards_run == 1 and result.store_url == pushed
    assert "moved the commit record aside" in capfd.readouterr().err
    _, listed = root.list_dir("manifests", hidden=True)
    assert [n[:len(".probecache-broken-part-00003-")] for n in listed if n.startswith(".")] == [
        ".probecache-broken-part-00003-"]
    report = verify_store(pushed)
    assert report.ok and any("set aside" in n for n in report.notes), (report.problems, report.notes)
    got, want = open_store(pushed), tiny_remote_source
    ids = want.manifest(columns=["example_id"])["example_id"].to_pylist()
    assert sorted(got.manifest(columns=["example_id"])["example_id"].to_pylist()) == sorted(ids)
    for eid in ids:
        assert torch.equal(got.hidden(eid), want.hidden(eid)), eid
    assert extract(config).cache_hit
