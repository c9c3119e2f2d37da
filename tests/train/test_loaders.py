"""Train-stage loaders (train/loaders.py): pooled tier and token stream against the store's own readers.

One bf16 store of 30 examples (train 20 / validation 5 / test 5) in shards of 6, built once per module with
the extractor on the tiny random Llama (L+1 = 4 layers, d = 64).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from probecache.store.codecs import storage_dtype
from probecache.store.errors import StoreError
from probecache.store.layers import LayerSelectionError
from probecache.store.reader import open_store
from probecache.train.arena import TokenArena
from probecache.train.errors import TrainError
from probecache.train.loaders import Batch, PooledData, TokenStream, load_pooled
from probecache.train.prefetch import THREAD_PREFIX

SPLITS = {"train": 20, "validation": 5, "test": 5}
LAYER_CHOICES = [None, [0, 2, 3], [1], [3, 1]]


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory, reviews_csv_writer):
    from probecache.extract.config import ExtractConfig
    from probecache.extract.run import extract

    folder = tmp_path_factory.mktemp("loaders")
    data = reviews_csv_writer(folder / "reviews.csv", positive_every=3)
    config = ExtractConfig(dataset=f"csv:{data}", model=str(tiny_model), root=str(folder / "stores"), dtype="bf16",
                           device="cpu", shard_size=6, batch_tokens=96, progress=False)
    return open_store(extract(config).store_path)


def manifest_ids(store, split) -> list[str]:
    return store.manifest(split=split, columns=["example_id"])["example_id"].to_pylist()


def epoch_ids(stream: TokenStream, epoch: int) -> list[str]:
    return [eid for batch in stream.epoch(epoch) for eid in batch.example_ids]


def test_store_shape(store):
    assert store.n_layers == 4 and store.hidden_size == 64 and store.logical_dtype == "bfloat16"
    segments = set(store.manifest(split="train", columns=["segment"])["segment"].to_pylist())
    assert len(segments) >= 3  # the shuffle tests need several shards of the split


# ---- pooled tier ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mean", "last"])
@pytest.mark.parametrize("layers", LAYER_CHOICES, ids=str)
def test_pooled_equals_store_readers(store, kind, layers):
    for split, n in SPLITS.items():
        data = load_pooled(store, split, kind=kind, layers=layers)
        assert isinstance(data, PooledData)
        ids = manifest_ids(store, split)
        assert data.example_ids == ids and len(data) == n
        expected = getattr(store, kind)(ids, layers).to(torch.float32)
        assert data.x.dtype == torch.float32 and data.x.shape == (n, 4 if layers is None else len(layers), 64)
        assert torch.equal(data.x, expected)
        labels = store.manifest(split=split, columns=["label"])["label"].to_pylist()
        assert data.y.dtype == torch.long and data.y.tolist() == labels
        assert data.label_names == store.label_names


def test_pooled_rejects_bad_arguments(store):
    with pytest.raises(ValueError, match="kind"):
        load_pooled(store, "train", kind="max")
    with pytest.raises(LayerSelectionError, match="out of range"):  # the store's one layer grammar
        load_pooled(store, "train", layers=[4])
    with pytest.raises(TrainError, match="no committed examples"):
        load_pooled(store, "nope")


def test_pooled_accepts_a_path(store):
    assert torch.equal(load_pooled(store.path, "test").x, load_pooled(store, "test").x)


def test_pooled_tier_is_decoded_once_per_open_store(store, monkeypatch):
    """A sweep's groups and its test read load a split again: the open store returns the decoded tier it has."""
    fresh = open_store(store.path)
    reads = []
    real = fresh.read_pooled
    monkeypatch.setattr(fresh, "read_pooled", lambda *a, **k: reads.append(a) or real(*a, **k))
    first = load_pooled(fresh, "train", layers=[1, 2])
    n = len(reads)
    assert n > 0 and load_pooled(fresh, "train", layers=[1, 2]) is first and len(reads) == n
    other = load_pooled(fresh, "train", layers=[1, 2], ids=first.example_ids[:3])  # other arguments: read
    assert len(reads) > n and other.example_ids == first.example_ids[:3]
    assert torch.equal(other.x, first.x[:3])
    assert load_pooled(open_store(store.path), "train", layers=[1, 2]) is not first  # another open store: its own


# ---- token stream -----------------------------------------------------------------------------------------


def check_batch(store, batch: Batch, layers, dtype=torch.float32):
    b, n_layers, t_max, d = batch.hidden.shape
    assert b == len(batch.example_ids) == batch.y.shape[0] == batch.mask.shape[0]
    assert n_layers == (4 if layers is None else len(layers)) and d == 64
    assert batch.hidden.dtype == dtype and batch.mask.dtype == torch.bool and batch.y.dtype == torch.long
    lengths = dict(zip(*(store.manifest(columns=["example_id", "n_tokens"])[c].to_pylist()
                         for c in ("example_id", "n_tokens")), strict=True))
    labels = dict(zip(*(store.manifest(columns=["example_id", "label"])[c].to_pylist()
                        for c in ("example_id", "label")), strict=True))
    assert t_max == max(lengths[eid] for eid in batch.example_ids)  # padded to the batch's own longest
    for i, eid in enumerate(batch.example_ids):
        n = lengths[eid]
        assert batch.mask[i].sum() == n and batch.mask[i, :n].all()  # exactly n real tokens, padding at the end
        expected = store.hidden(eid, layers)  # (L', n, d) bf16
        assert torch.equal(batch.hidden[i, :, :n], expected.to(dtype))
        assert not batch.hidden[i, :, n:].any()
        assert batch.y[i] == labels[eid]


@pytest.mark.parametrize("layers", LAYER_CHOICES, ids=str)
def test_stream_batches_equal_store_hidden(store, layers):
    for split, n in SPLITS.items():
        stream = TokenStream(store, split, layers=layers, batch_size=4, seed=1, buffer_tokens=64)
        assert len(stream) == n and stream.label_names == store.label_names
        seen = []
        for batch in stream.epoch(0):
            check_batch(store, batch, layers)
            seen += batch.example_ids
        assert sorted(seen) == sorted(manifest_ids(store, split)) and len(seen) == n  # each exactly once


def test_stream_keeps_the_stored_dtype(store):
    stream = TokenStream(store, "validation", layers=[0, 2, 3], batch_size=3, dtype=None)
    batches = list(stream.epoch(0))
    assert [len(b) for b in batches] == [3, 2] and stream.n_batches == 2
    for batch in batches:
        check_batch(store, batch, [0, 2, 3], dtype=torch.bfloat16)


def test_every_epoch_has_every_example_once(store):
    stream = TokenStream(store, "train", batch_size=3, seed=7, buffer_tokens=100)
    orders = [epoch_ids(stream, e) for e in range(5)]
    for order in orders:
        assert len(order) == 20 and sorted(order) == sorted(manifest_ids(store, "train"))
    assert len({tuple(o) for o in orders}) == 5  # epochs differ


def test_order_is_a_pure_function_of_seed_and_epoch(store):
    a = TokenStream(store, "train", batch_size=5, seed=3, buffer_tokens=80)
    b = TokenStream(open_store(store.path), "train", batch_size=5, seed=3, buffer_tokens=80)
    for e in range(3):
        assert epoch_ids(a, e) == epoch_ids(b, e)
    assert epoch_ids(a, 2) == epoch_ids(a, 2)  # replaying an epoch gives the same order
    assert epoch_ids(a, 0) != epoch_ids(a, 1)
    assert epoch_ids(a, 0) != epoch_ids(TokenStream(store, "train", batch_size=5, seed=4, buffer_tokens=80), 0)
    assert a.segment_order(0) != a.segment_order(1) or a.segment_order(1) != a.segment_order(2)
    # iterating the stream walks epochs 0, 1, 2, ...
    c = TokenStream(store, "train", batch_size=5, seed=3, buffer_tokens=80)
    assert [[eid for batch in c for eid in batch.example_ids] for _ in range(2)] == [epoch_ids(a, 0), epoch_ids(a, 1)]


def test_order_is_the_same_in_a_fresh_process(store):
    code = ("import sys; from probecache.train.loaders import TokenStream; "
            "s = TokenStream(sys.argv[1], 'train', batch_size=4, seed=11, buffer_tokens=50); "
            "print(','.join(e for b in s.epoch(3) for e in b.example_ids))")
    out = subprocess.run([sys.executable, "-c", code, str(store.path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == epoch_ids(
        TokenStream(store, "train", batch_size=4, seed=11, buffer_tokens=50), 3)


def test_no_shuffle_is_manifest_order(store):
    for split in SPLITS:
        stream = TokenStream(store, split, batch_size=4, shuffle=False)
        assert epoch_ids(stream, 0) == epoch_ids(stream, 5) == manifest_ids(store, split)


@pytest.mark.parametrize("buffer_tokens", [0, 30, 120])
def test_buffer_is_bounded(store, buffer_tokens):
    table = store.manifest(split="train", columns=["segment", "n_tokens"])
    per_segment: dict[str, int] = {}
    for seg, n in zip(table["segment"].to_pylist(), table["n_tokens"].to_pylist(), strict=True):
        per_segment[seg] = per_segment.get(seg, 0) + n
    assert sum(per_segment.values()) > buffer_tokens + max(per_segment.values())  # the bound actually binds
    stream = TokenStream(store, "train", batch_size=2, seed=0, buffer_tokens=buffer_tokens)
    for e in range(3):
        assert len(epoch_ids(stream, e)) == 20
    assert 0 < stream.peak_buffered_tokens <= buffer_tokens + max(per_segment.values())


@pytest.mark.parametrize("layers", [[2], [1, 2]])
def test_buffered_examples_are_pages_not_views_of_their_segment(store, layers):
    """A view would pin its whole segment while it waits in the buffer: what the stream holds of an example is
    the ids of its arena pages, and the pages hold its values."""
    stream = TokenStream(store, "train", layers=layers)
    arena = TokenArena(len(layers), store.hidden_size, storage_dtype(store.logical_dtype), stream.page_tokens)
    for segment in stream.segment_order(0):
        block = store.read_tokens(segment, layers=layers, decode=False)  # (L', T, d)
        for example, pages in stream._read_segment(segment, arena):
            assert all(type(page) is int for page in pages)
            values = np.zeros((len(layers), example.n_tokens, store.hidden_size), dtype=block.dtype)
            arena.gather(pages, example.n_tokens, values)
            ((start, stop),) = example.ranges
            assert np.array_equal(values, block[:, start:stop])


def test_large_buffer_mixes_across_segments(store):
    # with the whole split in the buffer, the first batch is not confined to one segment
    stream = TokenStream(store, "train", batch_size=8, seed=0, buffer_tokens=10**9)
    segment_of = dict(zip(*(store.manifest(columns=["example_id", "segment"])[c].to_pylist()
                            for c in ("example_id", "segment")), strict=True))
    first = next(iter(stream.epoch(0)))
    assert len({segment_of[eid] for eid in first.example_ids}) > 1
    assert stream.peak_buffered_tokens == stream.n_tokens


def test_train_stage_imports_no_extractor_or_transformers():
    code = ("import sys, probecache.train.loaders; "
            "bad = [m for m in sys.modules if m == 'transformers' or m.startswith(('transformers.', "
            "'probecache.extract', 'probecache.cli'))]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_only_segments_of_the_split_are_opened(store):
    fresh = open_store(store.path)
    wanted = set(fresh.manifest(split="test", columns=["segment"])["segment"].to_pylist())
    assert len(wanted) < len(set(fresh.manifest(columns=["segment"])["segment"].to_pylist()))
    list(TokenStream(fresh, "test", batch_size=2).epoch(0))
    load_pooled(fresh, "test", kind="last")
    assert set(fresh._groups) == wanted


# ---- prefetching reader (train/prefetch.py) ---------------------------------------------------------------


def prefetch_threads_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def batches_of(stream: TokenStream, epoch: int) -> list[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(b.example_ids, b.hidden, b.mask, b.y) for b in stream.epoch(epoch)]


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "manifest-order"])
@pytest.mark.parametrize("layers", [None, [3, 1]], ids=str)
@pytest.mark.parametrize(("prefetch", "threads"), [(1, 1), (2, None), (3, 2)])
def test_prefetch_yields_exactly_the_serial_batches(store, shuffle, layers, prefetch, threads):
    def stream(**kw):
        return TokenStream(open_store(store.path), "train", layers=layers, batch_size=3, shuffle=shuffle, seed=5,
                           buffer_tokens=40, dtype=None, **kw)

    serial, ahead = stream(prefetch=0), stream(prefetch=prefetch, prefetch_threads=threads)
    readers: set[str] = set()
    read = ahead._read_segment
    ahead._read_segment = lambda *args: (readers.add(threading.current_thread().name), read(*args))[1]
    for e in range(3):
        want, got = batches_of(serial, e), batches_of(ahead, e)
        assert [w[0] for w in want] == [g[0] for g in got]  # example ids, batch by batch
        for w, g in zip(want, got, strict=True):
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(w[1:], g[1:], strict=True))
    assert readers and all(name.startswith(THREAD_PREFIX) for name in readers)  # the reads did run ahead
    assert ahead.peak_buffered_tokens == serial.peak_buffered_tokens
    assert not prefetch_threads_alive()


def test_prefetch_default_is_on_and_zero_or_bad_values_are_handled(store):
    assert TokenStream(store, "validation").prefetch >= 1
    with pytest.raises(TrainError, match="prefetch must be >= 0"):
        TokenStream(store, "validation", prefetch=-1)
    with pytest.raises(TrainError, match="prefetch_threads >= 1"):
        TokenStream(store, "validation", prefetch_threads=0)


def test_a_damaged_segment_raises_the_same_store_error_through_the_prefetching_reader(store, tmp_path):
    copy = shutil.copytree(store.path, tmp_path / store.path.name)
    # the last segment of the epoch's order: earlier segments are read (and batches yielded) first
    segment = TokenStream(open_store(copy), "train").segment_order(0)[-1]
    chunk = next(p for p in sorted((copy / "segments" / segment / "hidden" / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    outcomes = {}
    for prefetch in (0, 2):  # each on a fresh reader: no file checked (or cached) by the other
        stream = TokenStream(open_store(copy), "train", batch_size=2, seed=0, buffer_tokens=0, prefetch=prefetch)
        seen = []
        with pytest.raises(StoreError) as caught:
            for batch in stream.epoch(0):
                seen += batch.example_ids
        outcomes[prefetch] = (str(caught.value), seen)
        assert not prefetch_threads_alive()
    message, seen = outcomes[2]
    assert "\n" not in message and message.startswith(f"{copy}/segments/{segment}/hidden/c/")
    assert "is corrupted (crc32c differs from its commit record)" in message
    assert seen  # the intact segments before it were delivered first, as the serial reader does
    assert outcomes[2] == outcomes[0]  # the same one-line message after the same batches


def test_leaving_an_epoch_early_leaves_no_reader_threads(store):
    stream = TokenStream(open_store(store.path), "train", batch_size=2, seed=0, buffer_tokens=0, prefetch=2)
    batches = stream.epoch(0)
    next(batches)
    assert prefetch_threads_alive()  # reading ahead while the consumer holds the first batch
    batches.close()
    assert not prefetch_threads_alive()
    for _ in stream.epoch(1):  # a for loop left by break: the generator is collected and closed
        break
    assert not prefetch_threads_alive()
