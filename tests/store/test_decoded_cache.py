"""The decoded cache (store/decoded_cache.py): the same batches, fewer decodes, checked entries, a bounded folder.

One bf16 store of the 60-review sentiment set on the tiny random Llama (shards of 8), read by token streams with
and without a cache. What must hold:

- batches through the cache are the batches of the plain reader (ids, masks, values), in every epoch, and an
  epoch after the first decodes nothing from the store;
- an entry that is flipped, truncated or not a cache file at all is never served: it is deleted and the block
  is read from the store again;
- the folder stays within its limit: others' entries are evicted least recently used first, a process never
  evicts the entries it is using, and what does not fit is read from the store (counted as skipped);
- the key follows the bytes: other layers, another range or another commit record is another entry;
- an entry deleted under a reader (another process's eviction, `store decoded-cache --clear`) costs a decode.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from probecache.store.decoded_cache import MAGIC, SUFFIX, DecodedCache, read_entry
from probecache.store.errors import StoreError
from probecache.store.reader import open_store
from probecache.train.loaders import TokenStream

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def store_path(tiny_model, sentiment_csv, tmp_path_factory, extract_tiny_store):
    return extract_tiny_store(tiny_model, tmp_path_factory.mktemp("decoded-cache"), sentiment_csv).path


def batches(store, epoch: int, layers=LAYERS, split: str = "train") -> list:
    stream = TokenStream(store, split, layers=layers, batch_size=4, seed=3, buffer_tokens=40, dtype=None)
    return [(b.example_ids, b.mask.clone(), b.hidden.clone()) for b in stream.epoch(epoch)]


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (ids, mask, hidden), (ids2, mask2, hidden2) in zip(got, want, strict=True):
        assert ids == ids2
        assert mask.equal(mask2)
        assert hidden.dtype == hidden2.dtype and hidden.equal(hidden2)


class CountingStore:
    """Counts the store reads a cache makes (the store itself is real)."""

    def __init__(self, store, monkeypatch):
        self.calls = 0
        real = store.read_tokens

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(store, "read_tokens", counted)


def cached_store(path, folder, limit: int = 1 << 30):
    return open_store(path, decoded_cache=DecodedCache(folder, limit))


def entry_files(folder) -> list:
    return sorted(folder.rglob(f"*{SUFFIX}"))


def test_batches_are_the_plain_readers_and_later_epochs_decode_nothing(store_path, tmp_path, monkeypatch):
    plain = open_store(store_path)
    store = cached_store(store_path, tmp_path / "cache")
    reads = CountingStore(store, monkeypatch)
    segments = len(plain.segments("train"))
    assert_same(batches(store, 0), batches(plain, 0))
    assert reads.calls == segments and store.decoded_cache.stats.written == segments
    assert len(entry_files(tmp_path / "cache")) == segments
    reads.calls = 0
    for epoch in (1, 2):
        assert_same(batches(store, epoch), batches(plain, epoch))
    assert reads.calls == 0 and store.decoded_cache.stats.hits == 2 * segments
    # a new process (a new cache object on the same folder) reads the entries too
    again = cached_store(store_path, tmp_path / "cache")
    assert_same(batches(again, 5), batches(plain, 5))
    assert again.decoded_cache.stats.hits == segments and again.decoded_cache.stats.written == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_a_damaged_entry_is_never_served(store_path, tmp_path, damage):
    plain = open_store(store_path)
    batches(cached_store(store_path, tmp_path / "cache"), 0)
    victim = entry_files(tmp_path / "cache")[0]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10  # one bit of one value
    elif damage == "truncate":
        data = data[:-64]
    elif damage == "foreign":
        data = b"\x93NUMPY" + data[len(MAGIC):]
    else:
        data = b""
    victim.write_bytes(bytes(data))
    assert read_entry(victim) is None
    store = cached_store(store_path, tmp_path / "cache")
    assert_same(batches(store, 1), batches(plain, 1))
    stats = store.decoded_cache.stats
    assert stats.rejected == 1 and stats.written == 1  # read from the store again and kept again
    assert read_entry(victim) is not None


def test_the_limit_bounds_the_folder_evicting_others_first(store_path, tmp_path):
    plain = open_store(store_path)
    folder = tmp_path / "cache"
    # another user's entries (other layers: other keys), older than anything this run writes
    other = cached_store(store_path, folder)
    batches(other, 0, layers=[0])
    theirs = entry_files(folder)
    for path in theirs:
        os.utime(path, (1, 1))
    entry = max(p.stat().st_size for p in entry_files(folder)) * len(LAYERS)  # one block of two layers, at most
    limit = 3 * entry
    store = cached_store(store_path, folder, limit)
    assert_same(batches(store, 0), batches(plain, 0))
    sizes = [p.stat().st_size for p in entry_files(folder)]
    assert sum(sizes) <= limit
    mine = [p for p in entry_files(folder) if p not in theirs]
    stats = store.decoded_cache.stats
    assert stats.written == len(mine) >= 2 and stats.skipped == len(plain.segments("train")) - len(mine)
    assert len(set(theirs) & set(entry_files(folder))) < len(theirs)  # room was made from theirs, not refused
    # the next epoch keeps its own entries (no thrash): hits for those, the rest read from the store, nothing evicted
    assert_same(batches(store, 1), batches(plain, 1))
    assert store.decoded_cache.stats.hits == len(mine) and set(mine) <= set(entry_files(folder))


def test_a_limit_of_zero_or_a_block_larger_than_the_limit_keeps_nothing(store_path, tmp_path):
    plain = open_store(store_path)
    store = cached_store(store_path, tmp_path / "cache", limit=100)
    assert_same(batches(store, 0), batches(plain, 0))
    assert entry_files(tmp_path / "cache") == [] and store.decoded_cache.stats.skipped > 0
    assert DecodedCache.from_option("0") is None and DecodedCache.from_option(None) is None


def test_the_key_follows_layers_ranges_and_commit_record(store_path, tmp_path):
    store = cached_store(store_path, tmp_path / "cache")
    cache = store.decoded_cache
    segment = store.segments("train")[0]
    files = store.segment_files(segment)
    ranges = [[(0, 4)], [(4, 10)], [(0, 2), (10, 13)]]  # the last: a shared prefix, then its own tokens
    key = cache._key(store, segment, files, ranges, [1, 2])
    assert key == cache._key(store, segment, dict(files), [list(r) for r in ranges], [1, 2])
    assert key != cache._key(store, segment, files, ranges, [1])
    assert key != cache._key(store, segment, files, ranges[:2], [1, 2])
    name = sorted(files)[0]
    changed = {**files, name: (files[name][0], "00000000")}  # the segment re-extracted or repaired: other bytes
    assert key != cache._key(store, segment, changed, ranges, [1, 2])
    block = store.read_tokens(segment, 0, 13, [1, 2], decode=False)  # (L', 13, d)
    want = [block[:, 0:4], block[:, 4:10], np.concatenate([block[:, 0:2], block[:, 10:13]], axis=1)]
    for _ in range(2):  # decoded, then from the cache
        got = cache.read_examples(store, segment, ranges, [1, 2])
        assert len(got) == 3 and all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert cache.stats.hits == 1 and cache.stats.written == 1


def test_entries_deleted_under_a_reader_cost_a_decode(store_path, tmp_path):
    plain = open_store(store_path)
    store = cached_store(store_path, tmp_path / "cache")
    batches(store, 0)
    freed = DecodedCache(tmp_path / "cache", 0).clear(store.store_id)  # `store decoded-cache --clear`
    assert freed > 0 and entry_files(tmp_path / "cache") == []
    assert_same(batches(store, 1), batches(plain, 1))
    assert store.decoded_cache.stats.hits == 0 and store.decoded_cache.stats.written == 2 * len(plain.segments("train"))


def test_a_bad_size_is_one_line():
    with pytest.raises(StoreError, match="500M, 20G"):
        DecodedCache.from_option("lots")


def test_examples_from_an_entry_are_the_stores_values(store_path, tmp_path):
    """Decoded on the first read, from the entry (one array, viewed per example) on the second: the same values,
    (L', n, d), as the store's own read."""
    store = cached_store(store_path, tmp_path / "cache")
    segment = store.segments("train")[0]
    want = store.read_tokens(segment, 0, 10, [1, 2], decode=False)  # (L', 10, d)
    for _ in range(2):
        first, second = store.decoded_cache.read_examples(store, segment, [[(0, 4)], [(4, 10)]], [1, 2])
        assert first.shape == (2, 4, store.hidden_size) and second.shape == (2, 6, store.hidden_size)
        assert np.array_equal(first, want[:, :4]) and np.array_equal(second, want[:, 4:])
    assert store.decoded_cache.stats.hits == 1 and store.decoded_cache.stats.written == 1


# ---- through `probecache train` and `probecache store decoded-cache` -------------------------------------


def test_train_with_a_decoded_cache_is_the_same_run(store_path, tmp_path):
    import json

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from probecache.cli import app

    runner = CliRunner()
    args = ["train", "--store", str(store_path), "--probe", "mha", "--downcast", "16", "--epochs", "2",
            "--batch-size", "8", "--no-progress"]
    cache = ["--decoded-cache", "64M", "--decoded-cache-dir", str(tmp_path / "decoded")]
    runs = {}
    for name, extra in (("plain", []), ("first", cache), ("second", cache)):
        done = runner.invoke(app, [*args, *extra, "--runs-dir", str(tmp_path / name)])
        assert done.exit_code == 0, done.output
        (runs[name],) = (tmp_path / name).iterdir()
    for name in ("first", "second"):
        assert json.loads((runs[name] / "metrics.json").read_text()) == json.loads(
            (runs["plain"] / "metrics.json").read_text())
        assert pq.read_table(runs[name] / "scores.parquet").equals(pq.read_table(runs["plain"] / "scores.parquet"))
    first, second = (json.loads((runs[n] / "config.json").read_text())["decoded_cache"] for n in ("first", "second"))
    assert first["written"] > 0 and second["written"] == 0 and second["hits"] == first["written"] + first["hits"]
    shown = runner.invoke(app, ["store", "decoded-cache", "--dir", str(tmp_path / "decoded"), "--json"])
    (entry,) = json.loads(shown.output)["stores"].values()
    assert entry["entries"] == first["written"]
    cleared = runner.invoke(app, ["store", "decoded-cache", "--dir", str(tmp_path / "decoded"), "--clear"])
    assert cleared.exit_code == 0 and "empty" in cleared.output and not list((tmp_path / "decoded").rglob("*.blk"))


def test_train_refuses_a_bad_decoded_cache_size(store_path, tmp_path, one_line_error):
    from typer.testing import CliRunner

    from probecache.cli import app

    done = CliRunner().invoke(app, ["train", "--store", str(store_path), "--probe", "scoring", "--decoded-cache",
                                    "lots", "--runs-dir", str(tmp_path / "runs")])
    one_line_error(done, "--decoded-cache 'lots': give a size such as 500M or 20G")
