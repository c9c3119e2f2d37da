"""Training memory is bounded by the shuffle buffer, the segments in flight and one batch, not by the store.

Two bf16 stores extracted from the same 40 labelled rows on the tiny random Llama (L+1 = 4 layers, d = 64),
shards of 8: x1 holds the rows once, x4 holds them four times over (new ids), so both have segments of the
same token counts and differ only in how many there are. The same TokenStream (a buffer much smaller than
either split) runs an epoch over each, and three things must not grow with the store:

- ``peak_held_tokens``: tokens the stream held at once in its arena pages (read ahead, buffered, waiting for a
  batch) stays under buffer + (1 + prefetch) segments + one batch, the same bound for both, and so do the
  bytes of pages in use at once (``peak_arena_bytes``, page rounding included);
- the traced heap (tracemalloc, which sees numpy's and zarr's buffers) peaks at the same size for both: a
  cache of decoded segments, a view pinning a whole segment or a split read up front would show here even if
  the counter missed it;
- reads: one ``read_tokens`` per segment of the split per epoch, each segment's zarr group opened once per
  reader, no manifest scan during an epoch (no per-example opens, nothing quadratic).

Each bound is checked to bind: the x4 split is several times the bound, so a loader that held it would fail.
"""

from __future__ import annotations

import csv
import gc
import tracemalloc

import pytest
from probecache.store import reader as store_reader
from probecache.store.reader import open_store
from probecache.train.errors import TrainError
from probecache.train.loaders import TokenStream

ROWS = 40
BUFFER_TOKENS = 120
BATCH = 4
WORDS = ["great", "awful", "quiet", "loud", "smart", "dull", "moving", "clumsy"]


def write_rows(path, copies: int):
    """``copies`` x ROWS rows (train 4 : validation 1), the same texts in the same order each time (varied
    lengths, 2 classes)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "split"])
        for c in range(copies):
            for i in range(ROWS):
                words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 7))
                split = "validation" if i % 5 == 4 else "train"  # given, so extraction carves nothing
                w.writerow([f"c{c}-e{i:02d}", f"review {i}: {words}", "pos" if i % 2 else "neg", split])
    return path


@pytest.fixture(scope="module")
def stores(tiny_model, tmp_path_factory, extract_tiny_store):
    folder = tmp_path_factory.mktemp("memory-bound")
    return {copies: extract_tiny_store(tiny_model, folder / f"x{copies}", write_rows(folder / f"x{copies}.csv", copies))
            for copies in (1, 4)}


def segment_tokens(store) -> dict[str, int]:
    table = store.manifest(split="train", columns=["segment", "n_tokens"])
    out: dict[str, int] = {}
    for seg, n in zip(table["segment"].to_pylist(), table["n_tokens"].to_pylist(), strict=True):
        out[seg] = out.get(seg, 0) + n
    return out


def held_bound(store, prefetch: int) -> int:
    """Tokens the stream may hold at once: the buffer, the segment being pushed and those read ahead, a batch."""
    longest = max(store.manifest(split="train", columns=["n_tokens"])["n_tokens"].to_pylist())
    return BUFFER_TOKENS + (1 + prefetch) * max(segment_tokens(store).values()) + BATCH * longest


def arena_bound(stream: TokenStream, tokens: int) -> int:
    """Bytes of arena pages that hold ``tokens`` tokens: each example wastes less than a page, and there are at
    most ``tokens`` / the shortest example's length of them."""
    shortest = min(stream.store.manifest(split="train", columns=["n_tokens"])["n_tokens"].to_pylist())
    pages = -(-tokens // stream.page_tokens) + tokens // shortest
    return pages * len(stream.layers) * stream.page_tokens * stream.store.hidden_size * 2  # bf16


def test_the_stores_differ_only_in_segment_count(stores):
    one, four = segment_tokens(stores[1]), segment_tokens(stores[4])
    assert len(four) == 4 * len(one) >= 16
    assert sorted(four.values()) == sorted(list(one.values()) * 4)  # same segments, four times over
    assert held_bound(stores[1], 1) == held_bound(stores[4], 1)
    assert sum(four.values()) > 3 * held_bound(stores[4], 1)  # holding the x4 split would break the bound


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_held_tokens_are_bounded_by_buffer_segments_and_batch_not_store(stores, prefetch):
    peaks = {}
    for copies, store in stores.items():
        stream = TokenStream(open_store(store.path), "train", batch_size=BATCH, seed=0, buffer_tokens=BUFFER_TOKENS,
                             prefetch=prefetch)
        for e in range(2):
            ids = [eid for batch in stream.epoch(e) for eid in batch.example_ids]
            assert sorted(ids) == sorted(stream.example_ids)  # every example once per epoch
        assert 0 < stream.peak_held_tokens <= held_bound(store, prefetch)
        assert 0 < stream.peak_arena_bytes <= arena_bound(stream, held_bound(store, prefetch))
        assert stream.peak_buffered_tokens <= BUFFER_TOKENS + max(segment_tokens(store).values())
        peaks[copies] = stream.peak_held_tokens
    assert peaks[4] <= held_bound(stores[1], prefetch)  # the x1 store's bound holds for the x4 store


def traced_peak(store, prefetch: int) -> int:
    """Peak bytes of the traced heap over one epoch of a fresh stream (construction and the first segment's
    metadata and checks done before tracing starts: those are per-store constants, not per-epoch memory)."""
    fresh = open_store(store.path)
    fresh._checked.limit = 0  # the reader's checked-file LRU (96 MB) would hold a whole tiny store: keep one file
    stream = TokenStream(fresh, "train", batch_size=BATCH, seed=0, buffer_tokens=BUFFER_TOKENS, prefetch=prefetch)
    for segment in stream.segment_order(0):
        fresh.segment_array(segment)  # open every group now: zarr metadata is O(segments), kept by the reader
    gc.collect()
    tracemalloc.start()
    try:
        n = sum(len(batch) for batch in stream.epoch(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == len(stream)
    return peak


@pytest.mark.parametrize(("prefetch", "share"), [(0, 0.25), (1, 0.5)])
def test_traced_heap_of_an_epoch_does_not_grow_with_the_store(stores, prefetch, share):
    values_per_token = stores[4].n_layers * stores[4].hidden_size * 2  # bf16 bytes of one token, every layer
    added = (sum(segment_tokens(stores[4]).values()) - sum(segment_tokens(stores[1]).values())) * values_per_token
    peaks = {copies: traced_peak(s, prefetch) for copies, s in stores.items()}
    # x4 streams ~1.6 MB more values than x1 through the same bounded buffers; its peak may differ by its larger
    # segments and by which segments' transient copies overlap in time (more so with a reader thread), not by a
    # share of the data. A loader holding its split (or a cache of decoded segments) would add all of it.
    assert peaks[4] - peaks[1] < share * added, (peaks, added)


def test_reads_are_one_per_segment_and_no_scans_per_example(stores, monkeypatch):
    calls = {"read_tokens": 0, "open_group": 0, "manifest": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(store_reader.Store, "read_tokens", counting("read_tokens", store_reader.Store.read_tokens))
    monkeypatch.setattr(store_reader.Store, "manifest", counting("manifest", store_reader.Store.manifest))
    monkeypatch.setattr(store_reader.zarr, "open_group", counting("open_group", store_reader.zarr.open_group))
    per_store = {}
    for copies, store in stores.items():
        n_segments = len(segment_tokens(store))
        fresh = open_store(store.path)
        calls.update(dict.fromkeys(calls, 0))
        stream = TokenStream(fresh, "train", batch_size=BATCH, seed=0, buffer_tokens=BUFFER_TOKENS)
        setup_manifest_scans = calls["manifest"]
        seen = []
        for e in range(2):
            calls.update(read_tokens=0)
            seen.append(sum(len(b) for b in stream.epoch(e)))
            assert calls["read_tokens"] == n_segments  # one contiguous read per segment, none per example
        assert seen == [len(stream)] * 2
        assert calls["open_group"] == n_segments  # each group opened once, on the first epoch only
        assert calls["manifest"] == setup_manifest_scans  # the epochs never scan the manifest
        per_store[copies] = setup_manifest_scans
    assert per_store[1] == per_store[4] <= 2  # set-up scans are a constant, not per example or per segment


GUARD_CHILD = """
import sys
from probecache.train import memory
memory.guard_heap()  # sets the mark
blocks = [bytearray(100_000) for _ in range(1500)]  # ~150 MB of heap blocks (each under the mmap threshold)
keep = blocks[-1]
del blocks  # all freed but the last, which pins the heap's top: only a trim can give the rest back
before = memory.resident_bytes()
trimmed = memory.guard_heap()
print(trimmed, memory.trims, before - memory.resident_bytes())
"""


@pytest.mark.parametrize(("slack_mb", "trims"), [("32", 1), ("0", 0), ("1000", 0)])
def test_the_heap_guard_returns_free_heap_past_its_slack(slack_mb, trims):
    """Free heap that glibc keeps (train/memory.py) goes back to the kernel once RSS grew past the slack, and
    only then (checked in a fresh interpreter: the guard is per process)."""
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | {"PROBECACHE_HEAP_SLACK_MB": slack_mb}
    out = subprocess.run([sys.executable, "-c", GUARD_CHILD], env=env, capture_output=True, text=True, check=True)
    trimmed, count, released = out.stdout.split()
    assert (trimmed, int(count)) == (str(trims == 1), trims)
    if trims:
        assert int(released) > 100 << 20  # most of the ~150 MB freed came back
    else:
        assert int(released) < 16 << 20


def test_a_bad_heap_slack_is_one_line_before_any_read(stores, monkeypatch):
    monkeypatch.setenv("PROBECACHE_HEAP_SLACK_MB", "lots")
    with pytest.raises(TrainError, match="PROBECACHE_HEAP_SLACK_MB must be a number of MB >= 0"):
        TokenStream(stores[1].path, "train")
