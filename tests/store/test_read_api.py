"""The public read API (store/reader.py) and the one layer grammar (store/layers.py) that every reader, loader
and command parses "which layers" with.

One bf16 store of 14 examples in shards of 5 on the tiny random Llama (L+1 = 4 layers, d = 64), checked
against the segment's zarr arrays opened directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from probecache.store.codecs import from_storage
from probecache.store.errors import StoreError
from probecache.store.layers import LayerSelectionError, layer_runs, select_layers
from probecache.store.reader import open_store


@pytest.mark.parametrize(("spec", "want"), [
    (None, [0, 1, 2, 3]), ("all", [0, 1, 2, 3]), (" ALL ", [0, 1, 2, 3]),
    (2, [2]), (-1, [3]), (slice(1, 3), [1, 2]), (slice(None, None, 2), [0, 2]),
    ([3, 0], [3, 0]), ((-1, -4), [3, 0]), (np.array([1, 2]), [1, 2]),
    ("0-1,3", [0, 1, 3]), ("3,0-1,1", [0, 1, 3]), ("1--1", [1, 2, 3]), ("-2", [2]), ("-3--2", [1, 2]),
])
def test_layer_grammar(spec, want):
    assert select_layers(spec, 4) == want


@pytest.mark.parametrize(("spec", "fragment"), [
    (4, "layer 4 is out of range"), (-5, "out of range"), ("0-9", "out of range"), ("a-b", "is not a layer list"),
    ("2-1", "range 2-1 is empty"), ("", "is not a layer list"), ([], "selects no layer"), (slice(3, 1), "no layer"),
    ([1.5], "layers are integers"), ([True], "layers are integers"),
])
def test_layer_grammar_refuses_in_one_line(spec, fragment):
    with pytest.raises(LayerSelectionError, match=fragment) as error:
        select_layers(spec, 4)
    assert "\n" not in str(error.value)
    assert isinstance(error.value, StoreError)  # the CLI prints store errors as one line


def test_layer_runs_keep_the_order_asked_for():
    assert layer_runs([0, 2, 3, 1]) == [slice(0, 1), slice(2, 4), slice(1, 2)]
    assert layer_runs([]) == []


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory, reviews_csv_writer):
    from probecache.extract.config import ExtractConfig
    from probecache.extract.run import extract

    folder = tmp_path_factory.mktemp("read_api")
    data = reviews_csv_writer(folder / "reviews.csv")
    config = ExtractConfig(dataset=f"csv:{data}", model=str(tiny_model), root=str(folder / "stores"), dtype="bf16",
                           device="cpu", shard_size=5, limit=14, progress=False)
    return open_store(extract(config).store_path)


def direct(store, segment: str, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store.layout.segment(segment)), mode="r")[name][...])


@pytest.mark.parametrize("layers", [None, [1], [3, 0, 1], "1-2", slice(0, 4, 3)])
def test_read_tokens_and_pooled_equal_the_arrays(store, layers):
    want = store.select_layers(layers)
    segments = store.segments()
    assert len(segments) == 3 and store.segments(split="train") == [s for s in segments if s in store.segments("train")]
    for segment in segments:
        hidden = direct(store, segment, "hidden")  # (L+1, T, d) stored uint16
        stored = store.read_tokens(segment, 3, 11, layers, decode=False)
        assert stored.dtype == np.uint16 and np.array_equal(stored, hidden[want, 3:11])
        assert torch.equal(store.read_tokens(segment, 3, 11, layers), from_storage(hidden[want, 3:11], "bfloat16"))
        assert np.array_equal(store.read_tokens(segment, layers=layers, decode=False), hidden[want])
        for kind, dtype in (("mean", "float32"), ("last", "bfloat16")):
            pooled = direct(store, segment, kind)  # (rows, L+1, d)
            assert torch.equal(store.read_pooled(segment, kind, layers), from_storage(pooled[:, want], dtype))


def test_example_reads_are_token_ranges(store):
    table = store.manifest(columns=["example_id", "segment", "token_offset", "n_tokens", "row"])
    for eid, segment, offset, n, row in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
        assert torch.equal(store.hidden(eid, "0,2-3"), store.read_tokens(segment, offset, offset + n, [0, 2, 3]))
        assert torch.equal(store.mean([eid], [3, 1])[0], store.read_pooled(segment, "mean", [3, 1])[row])


def test_read_api_refuses_in_one_line(store):
    segment = store.segments()[0]
    with pytest.raises(StoreError, match="has no array 'logits'"):
        store.segment_array(segment, "logits")
    with pytest.raises(StoreError, match="pooled tier 'max'"):
        store.read_pooled(segment, "max")
    with pytest.raises(LayerSelectionError, match="out of range"):
        store.read_tokens(segment, 0, 4, [7])
    assert store.segment_array(segment).shape[0] == store.n_layers
