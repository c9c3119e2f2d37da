"""The storage layer: URL parsing and validation, credential hygiene, and the Root operations on the real S3
server (conditional create decides races), on memory:// and on a local folder."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from probecache.store.errors import StoreError
from probecache.store.reader import list_stores, open_store
from probecache.store.remote import (
    Location,
    clean_key,
    is_remote,
    local_path,
    parse_root,
    parse_url,
    repair_url,
    root_text,
    scrub,
    store_root,
    writable_root,
)
from probecache.store.roots import LocalRoot, ObjectRoot, open_root


def test_parse_urls():
    loc = parse_url("s3://my-bucket/team/stores/")
    assert (loc.scheme, loc.bucket, loc.prefix, loc.url) == ("s3", "my-bucket", "team/stores", "s3://my-bucket/team/stores")
    assert parse_url("gs://bucket-1").url == "gs://bucket-1"
    assert parse_url("memory://tests/x").child("a/b").url == "memory://tests/x/a/b"
    assert is_remote("s3://bucket/p") and is_remote("memory://x")
    assert not is_remote("file:///tmp") and not is_remote("/tmp")
    assert repair_url(__import__("pathlib").Path("s3://bucket/p/id")) == "s3://bucket/p/id"
    assert str(local_path("file:///tmp/x")) == "/tmp/x"


@pytest.mark.parametrize("url", ["s3://bucket/a/../b", "s3://bucket/a//b", "s3://bucket/./b", "s3://bucket/a\\b",
                                 "s3://B/x", "s3://ab", "s3://bucket/p?endpoint=x", "ftp://bucket/p", "s3://bucket/a*"])
def test_bad_urls_are_refused(url):
    with pytest.raises(StoreError):
        parse_url(url)


def test_credentials_in_urls_are_refused_without_echoing_them():
    with pytest.raises(StoreError) as e:
        parse_url("s3://AKIAEXAMPLE:s3cr3tvalue@bucket/prefix")
    assert "s3cr3tvalue" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)


# (given, canonical text, remote?): any case, any slash count, Path-collapsed; local paths as given
CANONICAL = [
    ("S3://bucket/p", "s3://bucket/p", True),
    ("s3:/bucket/p", "s3://bucket/p", True),
    ("s3:///bucket/p/", "s3://bucket/p", True),
    ("s3:bucket/p", "s3://bucket/p", True),
    ("GS://bucket-1", "gs://bucket-1", True),
    ("Memory://Name/x", "memory://Name/x", True),
    (Path("s3://bucket/p/id"), "s3://bucket/p/id", True),
    (Path("S3://bucket/p"), "s3://bucket/p", True),
    ("file:///tmp/x", "/tmp/x", False),
    ("FILE:/tmp/x", "/tmp/x", False),
    ("file://localhost/tmp/x", "/tmp/x", False),
    ("stores", "stores", False),
    ("./a:b", "./a:b", False),  # a colon with no slash after it, or after ./, is part of a folder name
    ("a:b", "a:b", False),
    ("/data/run:1/stores", "/data/run:1/stores", False),
    ("~/stores", "~/stores", False),
]


@pytest.mark.parametrize(("given", "text", "remote"), CANONICAL)
def test_roots_parse_to_one_canonical_form(given, text, remote):
    assert root_text(given) == repair_url(given) == text
    assert is_remote(given) is remote
    parsed = parse_root(given)
    assert isinstance(parsed, Location) is remote
    assert (parsed.url if remote else parsed) == (text if remote else Path(text).expanduser().resolve())


KEY, SECRET = "AKIAFAKEKEY0EXAMPLE1", "wJalrXUtnFEMI0SECRET0VALUE"
WITH_CREDENTIALS = [
    f"S3://{KEY}:{SECRET}@bucket/p", f"s3:/{KEY}:{SECRET}@bucket/p", f"s3:///{KEY}:{SECRET}@b/p",
    f"Gs://u:{SECRET}@b/p", f"s3://{KEY}:{SECRET}@bucket/p", f"memory://{KEY}@name/p",
    f"s3://bucket/p?secret={SECRET}", f"s3://bucket/p?X-Amz-Signature={SECRET}&a=1", f"file://{KEY}:{SECRET}@host/x",
    f"FTP://{KEY}:{SECRET}@host/x", f"{KEY}:{SECRET}@bucket/p", f"s3://{KEY}:ab/{SECRET}@bucket/p",
    f"{KEY}:ab/{SECRET}@bucket/p", Path(f"S3://{KEY}:{SECRET}@bucket/p"),
]


@pytest.mark.parametrize("url", WITH_CREDENTIALS, ids=range(len(WITH_CREDENTIALS)))
def test_every_entry_refuses_credentials_without_echoing_them(url, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBECACHE_CACHE", str(tmp_path / "cache"))
    for entry in (parse_root, root_text, is_remote, local_path, open_root, store_root, writable_root, open_store,
                  list_stores):
        with pytest.raises(StoreError) as e:
            entry(url)
        message = str(e.value)
        assert KEY not in message and SECRET not in message, (entry, message)
        assert "credentials" in message and "AWS_ACCESS_KEY_ID" in message, (entry, message)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("url", ["http://host/p", "HTTPS://host/p", "a:/b", "c:/x", "az://c/p", "S4://bucket/p"])
def test_unknown_schemes_are_refused_naming_the_supported_ones(url):
    with pytest.raises(StoreError) as e:
        root_text(url)
    assert "unsupported URL scheme" in str(e.value) and "s3://" in str(e.value) and "./NAME" in str(e.value)


def test_a_long_scheme_is_not_echoed():
    with pytest.raises(StoreError) as e:
        root_text(f"{KEY}:/{SECRET}")
    assert KEY.lower() not in str(e.value).lower() and SECRET not in str(e.value)


@pytest.mark.parametrize("url", ["s3://bucket/p?endpoint=x", "s3://bucket/p#x", " s3://bucket/p", "'s3://bucket/p'",
                                 "file://host/x", "file:relative", "", "   ", "s3://KEY:SECRET/p", "s3://UPPER/p"])
def test_malformed_roots_are_refused(url):
    with pytest.raises(StoreError) as e:
        root_text(url)
    assert "SECRET" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a//b", "a/../../b", "a/./b", "", "a\\..\\b"])
def test_keys_cannot_leave_the_root(key, tmp_path):
    with pytest.raises(StoreError):
        clean_key(key)
    with pytest.raises(StoreError):
        LocalRoot(tmp_path).put(key or "..", b"x")
    with pytest.raises(StoreError):
        ObjectRoot(parse_url("memory://keys/p")).get(key or "..")


def test_scrub_masks_environment_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY")
    text = scrub("denied for AKIATESTKEY with topsecretvalue123 at https://h/x?X-Amz-Signature=abcdef&y=1 "
                 "and https://user:pw@host/p")
    assert "topsecretvalue123" not in text and "AKIATESTKEY" not in text and "abcdef" not in text
    assert "user:pw" not in text


def test_staging_root_is_local_and_per_url(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBECACHE_CACHE", str(tmp_path))
    a, b = store_root("s3://bucket/a"), store_root("s3://bucket/b")
    assert a != b and a.is_relative_to(tmp_path / "staging")
    assert store_root(str(tmp_path / "x")) == (tmp_path / "x").resolve()


def _exercise(root) -> None:
    assert root.get("missing") is None
    root.put("a/b/one.bin", b"1")
    root.put("a/two.bin", b"22")
    root.put("top.json", b"{}")
    assert root.get("a/b/one.bin") == b"1"
    assert {k: v.size for k, v in root.list("a").items()} == {"b/one.bin": 1, "two.bin": 2}
    folders, files = root.list_dir()
    assert folders == ["a"] and set(files) == {"top.json"}
    assert root.put_if_absent("manifests/part-00000.parquet", b"mine")
    assert not root.put_if_absent("manifests/part-00000.parquet", b"theirs")
    assert root.put_if_absent("manifests/part-00000.parquet", b"mine")  # a retry of our own commit
    assert root.get("manifests/part-00000.parquet") == b"mine"
    root.delete("a/two.bin")
    assert root.get("a/two.bin") is None
    assert root.child("a").get("b/one.bin") == b"1"


def test_root_operations_local_memory_s3(tmp_path, s3_env):
    _exercise(open_root(str(tmp_path / "local")))
    _exercise(open_root(f"memory://roots-{uuid.uuid4().hex[:6]}/p"))
    _exercise(open_root(s3_env.root))


def test_conditional_create_has_one_winner_on_s3(s3_env):
    root = open_root(s3_env.root)
    wins, barrier = [], threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        if root.put_if_absent("manifests/part-00007.parquet", f"attempt {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert root.get("manifests/part-00007.parquet") == f"attempt {wins[0]}".encode()


def test_read_only_credentials_cannot_write_and_errors_hold_no_secrets(s3_env):
    open_root(s3_env.root).put("x.bin", b"x")
    s3_env.use("reader")
    root = open_root(s3_env.root)
    assert root.get("x.bin") == b"x" and "x.bin" in root.list()
    with pytest.raises(StoreError) as e:
        root.put("y.bin", b"y")
    message = str(e.value)
    assert "access denied" in message
    for secret in (*s3_env.server.reader, *s3_env.server.writer):
        assert secret not in message
    s3_env.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(StoreError) as e:
        open_root(s3_env.root).get("x.bin")
    assert "wrong-secret-value" not in str(e.value)
