"""The Root contract (store/remote.py): a local folder, memory:// and S3 (the moto server of tests/conftest.py)
behave the same, first for the object operations, then for the store operations written once against them
(read, verify, gc, status, ls, info). memory:// lives in this process, so everything here runs in-process."""

from __future__ import annotations

import uuid

import pytest
import torch
from probecache.manifests.schema import part_stats
from probecache.store.errors import StoreError
from probecache.store.gc import gc_store
from probecache.store.integrity import crc32c_hex
from probecache.store.reader import list_stores, open_store
from probecache.store.roots import open_root
from probecache.store.status import store_status
from probecache.store.transfer import push
from probecache.store.verify import verify_store

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ["local", "memory", "s3"]
ORPHAN = "shard-00001-20200101T000000-0badf00d"
# valid keys a careless implementation mangles: spaces, non-ASCII, URL-reserved and percent-looking characters
ODD_NAMES = ["with space.bin", "ümlaut-ñ.bin", "plus+equals=comma,.bin", "percent%41at@tilde~(1).bin", "dots.a.b"]


@pytest.fixture(params=KINDS)
def root_url(request, tmp_path, monkeypatch) -> str:
    """An empty root of each kind (a fresh folder, memory name or bucket prefix), with its own mirror cache."""
    if request.param == "s3":
        return request.getfixturevalue("s3_env").root
    monkeypatch.setenv("PROBECACHE_CACHE", str(tmp_path / "cache"))
    if request.param == "local":
        return str(tmp_path / "root")
    return f"memory://contract-{uuid.uuid4().hex[:8]}/stores"


@pytest.fixture(scope="module")
def source(tiny_model, sentiment_csv, extract_tiny_store, tmp_path_factory):
    """A small local store (60 examples in 8 shards) that each test copies to the root under test."""
    return extract_tiny_store(tiny_model, tmp_path_factory.mktemp("contract-src") / "stores", sentiment_csv)


# ---- the object operations -------------------------------------------------------------------------------


def test_get_put_and_create_if_absent(root_url):
    root = open_root(root_url)
    assert root.get("a/b.bin") is None and root.info("a/b.bin") is None and root.checksum("a/b.bin") is None
    root.put("a/b.bin", b"one")
    root.put("a/b.bin", b"two")  # put replaces
    assert root.get("a/b.bin") == b"two" and root.info("a/b.bin").size == 3
    assert root.checksum("a/b.bin") == (3, crc32c_hex(b"two"))
    assert root.put_if_absent("c.bin", b"first") is True
    assert root.put_if_absent("c.bin", b"other") is False and root.get("c.bin") == b"first"  # exactly one winner
    assert root.put_if_absent("c.bin", b"first") is True  # a retry of our own create is not a lost race
    root.delete("c.bin")
    root.delete("c.bin")  # absent is fine
    assert root.get("c.bin") is None


def test_listings_and_children(root_url):
    root = open_root(root_url)
    for key, data in {"x/1.bin": b"1", "x/y/2.bin": b"22", "x/.hidden": b"h", "top.bin": b"t"}.items():
        root.put(key, data)
    assert {k: i.size for k, i in root.list("x").items()} == {"1.bin": 1, "y/2.bin": 2, ".hidden": 1}
    folders, files = root.list_dir("x")
    assert folders == ["y"] and list(files) == ["1.bin"]
    assert sorted(root.list_dir("x", hidden=True)[1]) == [".hidden", "1.bin"]
    assert root.list_dir("nothing-here") == ([], {}) and root.list("nothing-here") == {}
    assert root.tree("x/y")[0] == 2 and root.tree("x/y")[1] > 0
    child = root.child("x/y")
    assert child.url == f"{root.url}/x/y" and child.name == "y" and child.get("2.bin") == b"22"
    assert root.links("x") == []  # nothing here was made a link


def test_odd_but_valid_names_round_trip(root_url):
    root = open_root(root_url)
    for i, name in enumerate(ODD_NAMES):
        root.put(f"odd/{name}", bytes([i]) * (i + 1))
    assert {k: i.size for k, i in root.list("odd").items()} == {n: i + 1 for i, n in enumerate(ODD_NAMES)}
    assert sorted(root.list_dir("odd")[1]) == sorted(ODD_NAMES)
    for i, name in enumerate(ODD_NAMES):
        assert root.get(f"odd/{name}") == bytes([i]) * (i + 1)
        root.delete(f"odd/{name}")
    assert root.list("odd") == {}


@pytest.mark.parametrize("key", ["../escape", "/absolute", "a//b", "a/./b", "star*", "back\\slash", "nl\n"])
def test_keys_outside_the_root_are_refused(root_url, key):
    root = open_root(root_url)
    with pytest.raises(StoreError):
        root.put(key, b"x")
    with pytest.raises(StoreError):
        root.get(key)


def test_rename_and_delete_tree(root_url):
    root = open_root(root_url)
    root.put("t/a.bin", b"a")
    root.put("t/s/b.bin", b"bb")
    root.put("u/c.bin", b"c")
    assert root.rename("t", "u") is False and root.get("t/a.bin") == b"a"  # never over an existing tree
    assert root.rename("t", "v") is True and root.get("v/s/b.bin") == b"bb" and root.list("t") == {}
    assert root.rename("t", "w") is False  # gone
    assert root.remove_tree("v", lambda: True) is False and root.get("v/a.bin") == b"a"  # in use: kept
    assert root.remove_tree("v", lambda: False) is True and root.list("v") == {}
    root.delete_tree("u")
    assert root.list("u") == {} and root.get("u/c.bin") is None


# ---- the store operations --------------------------------------------------------------------------------


def _pushed(source, root_url) -> str:
    push(str(source.path), root_url)
    return f"{open_root(root_url).url}/{source.store_id}"


def test_a_copied_store_reads_verifies_and_lists_the_same(source, root_url):
    url = _pushed(source, root_url)
    store = open_store(url)
    ids = source.manifest(columns=["example_id"])["example_id"].to_pylist()
    assert store.manifest(columns=["example_id"])["example_id"].to_pylist() == ids
    for eid in ids[::7]:
        assert torch.equal(store.hidden(eid), source.hidden(eid)), eid
    assert torch.equal(store.mean(ids), source.mean(ids)) and torch.equal(store.last(ids), source.last(ids))
    report = verify_store(url)
    assert report.ok and report.notes == [] and report.parts_checked == 8, (report.problems, report.notes)
    assert report.bytes_checked == sum(s for p in source.layout.manifests.glob("part-*.parquet")
                                       for s, _ in part_stats(p)["files"].values())
    summary = store.summary()
    assert summary["path"] == url and summary["complete"] and summary["n_examples"] == 60
    assert {k: v for k, v in summary.items() if k != "path"} == {k: v for k, v in source.summary().items()
                                                                  if k != "path"}
    (listed,) = list_stores(root_url)
    assert listed["store_id"] == source.store_id and listed["path"] == url and "damaged" not in listed
    status = store_status(url)
    assert status["complete"] and status["counts"]["committed"] == 8 and status["examples_committed"] == 60


def test_verify_finds_a_flipped_byte(source, root_url):
    url = _pushed(source, root_url)
    root = open_root(url)
    segment = part_stats(source.layout.part(2))["segment"]
    key = next(f"segments/{segment}/{k}" for k in sorted(root.list(f"segments/{segment}")) if "/c/" in k)
    data = bytearray(root.get(key))
    data[len(data) // 2] ^= 0x10
    root.put(key, bytes(data))
    assert verify_store(url, checksums=False).ok  # same size: only reading the bytes finds it
    report = verify_store(url)
    assert not report.ok and report.problems == [f"{key}: crc32c {crc32c_hex(bytes(data))}, "
                                                  f"{crc32c_hex(source.layout.path.joinpath(key).read_bytes())} "
                                                  "recorded (corrupted)"]


def test_gc_removes_an_orphan_and_keeps_every_committed_segment(source, root_url):
    url = _pushed(source, root_url)
    root = open_root(url)
    committed = set(root.list_dir("segments")[0])
    real = part_stats(source.layout.part(1))["segment"]
    for rel in root.list(f"segments/{real}"):  # an attempt that lost its race: files, stats, no part
        root.put(f"segments/{ORPHAN}/{rel}", root.get(f"segments/{real}/{rel}"))
    root.put(f"stats/{ORPHAN}.json", b"{}")
    assert any(ORPHAN in n for n in verify_store(url).notes)
    young = gc_store(url, older_than_seconds=3600)  # just written: maybe a live attempt
    assert young.removed == [] and [k.path for k in young.kept] == [f"segments/{ORPHAN}"]
    report = gc_store(url, older_than_seconds=0)
    assert [(r.kind, r.path) for r in report.removed] == [("segment", f"segments/{ORPHAN}"),
                                                          ("stats", f"stats/{ORPHAN}.json")]
    assert set(root.list_dir("segments")[0]) == committed and root.list(f"segments/{ORPHAN}") == {}
    assert verify_store(url).ok and verify_store(url).notes == []
    eid = source.manifest(columns=["example_id"])["example_id"][0].as_py()
    assert torch.equal(open_store(url).hidden(eid), source.hidden(eid))


def test_gc_deletes_nothing_in_a_store_that_does_not_verify(source, root_url):
    url = _pushed(source, root_url)
    root = open_root(url)
    gone = part_stats(source.layout.part(3))["segment"]
    root.delete(f"segments/{gone}/zarr.json")
    for rel in root.list(f"segments/{part_stats(source.layout.part(1))['segment']}"):
        root.put(f"segments/{ORPHAN}/{rel}", b"x")
    with pytest.raises(StoreError, match="does not verify, so gc deletes nothing"):
        gc_store(url, older_than_seconds=0)
    assert root.list(f"segments/{ORPHAN}")
    report = verify_store(url)
    assert any("recorded file is missing" in p for p in report.problems)
    assert any("rerun the extract command" in n and "(3)" in n for n in report.notes), report.notes
