"""bench/baseline_formats.py: every peer format round-trips the model's hidden states, and its batch source
yields the store's split; bench/formats.py runs end to end (tiny random Llama: L+1 = 4, d = 64)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from probecache.lm.tokens import pad_batch
from probecache.train.data import TokenBatches, resolve_splits, split_examples

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:  # bench scripts import each other as top-level modules (run as bench/x.py)
    sys.path.insert(0, str(BENCH))

from baseline_formats import (  # noqa: E402
    FORMATS,
    ReaderBatches,
    Shape,
    StoreReader,
    forward_and_write,
    make_writer,
    open_reader,
)
from common import prepare  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(extract_tiny_store, tiny_model, sentiment_csv, tmp_path_factory):
    return extract_tiny_store(tiny_model, tmp_path_factory.mktemp("formats-store"), sentiment_csv)


@pytest.fixture(scope="module")
def written(tiny_model, sentiment_csv, tmp_path_factory):
    """Every format written by the benchmark's own loop, and the reference states of the same batches:
    example id -> (L+1, n, d) bf16, straight from ``output_hidden_states`` for the real tokens."""
    folder = tmp_path_factory.mktemp("formats")
    _, model, batches, pad_id, _ = prepare(f"csv:{sentiment_csv}", None, None, str(tiny_model), "bf16",
                                           folder / "stores")
    reference: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for batch in batches:
            ids, mask = pad_batch([p.token_ids for p in batch], pad_id, "cpu")
            states = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for b, p in enumerate(batch):
                reference[p.example.example_id] = torch.stack([h[b, : p.n_tokens] for h in states])  # (L+1, n, d)
    planned = [p for b in batches for p in b]
    shape = Shape(model.config.num_hidden_layers + 1, model.config.hidden_size, len(planned),
                  max(p.n_tokens for p in planned), torch.bfloat16)
    for name in FORMATS:
        writer = make_writer(name, folder / name, shape)
        if name == "arrow":
            writer.buffer_tokens = 200  # several save_to_disk shards, as a long run writes
        forward_and_write(model, batches, pad_id, writer)
    return folder, reference, shape


def expected(name: str, states: torch.Tensor) -> torch.Tensor:
    """What a format holds: the exact bf16 states for torch.save, their fp16 rounding for the numpy formats."""
    return states if name == "torch_save" else states.to(torch.float16)


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip(written, name):
    folder, reference, shape = written
    reader = open_reader(name, folder / name)
    assert sorted(reader.example_ids) == sorted(reference) and reader.bytes_on_disk() > 0
    for eid, states in reference.items():
        got = reader.read_example(reader.position[eid])
        assert got.shape == (shape.n_layers, states.shape[1], shape.hidden_size)
        if name == "torch_save":
            assert got.dtype == torch.bfloat16 and torch.equal(got, states)
        else:  # fp16 values (arrow hands them out widened to float32: datasets' numpy default)
            assert torch.equal(got.float(), expected(name, states).float())
    for layer in (0, shape.n_layers - 1):
        want = torch.cat([expected(name, reference[e])[layer] for e in reader.example_ids])  # (tokens, d)
        assert torch.equal(reader.read_layer(layer).float(), want.float())


def test_arrow_has_several_shards_and_token_rows(written):
    folder, reference, _ = written
    from datasets import load_from_disk

    shards = sorted((folder / "arrow").glob("shard-*"))
    assert len(shards) > 1
    rows = sum(len(load_from_disk(str(s))) for s in shards)
    assert rows == sum(s.shape[1] for s in reference.values())  # one row per token


def test_store_reader_matches_store(store):
    reader = StoreReader(store)
    layer = store.n_layers - 1
    want = torch.cat([store.hidden(e)[layer] for e in reader.example_ids])
    assert torch.equal(reader.read_layer(layer), want)
    assert torch.equal(reader.read_example(3), store.hidden(reader.example_ids[3]))
    assert 0 < reader.hidden_bytes() < reader.bytes_on_disk()


@pytest.mark.parametrize("name", ["torch_save", "hdf5"])
def test_batch_source_yields_the_store_split(written, store, name):
    folder, reference, shape = written
    splits = resolve_splits(store)
    ids, labels = split_examples(store, splits.train)
    source = ReaderBatches(open_reader(name, folder / name), ids, labels, 8, shuffle=True, seed=0)
    store_batches = list(TokenBatches(store, splits.train, None, 8, True, seed=0).epoch(0))
    batches = list(source.epoch(0))
    assert source.n_batches == len(batches) == len(store_batches)
    seen = {e: int(y) for b in batches for e, y in zip(b.example_ids, b.y.tolist(), strict=True)}
    assert seen == dict(zip(ids, labels.tolist(), strict=True))  # every example once, with its manifest label
    assert sum(len(b) for b in batches) == len(ids)
    assert [b.example_ids for b in source.epoch(0)] == [b.example_ids for b in batches]  # seeded
    assert [b.example_ids for b in source.epoch(1)] != [b.example_ids for b in batches]
    for batch in batches:
        assert batch.hidden.dtype == store_batches[0].hidden.dtype == torch.bfloat16
        for b, eid in enumerate(batch.example_ids):
            n = reference[eid].shape[1]
            assert batch.mask[b].sum() == n and not batch.mask[b, n:].any()
            want = expected(name, reference[eid]).to(torch.bfloat16)
            assert torch.equal(batch.hidden[b, :, :n], want)
            assert not batch.hidden[b, :, n:].any()


def test_formats_benchmark_quick(tiny_model, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(BENCH / "formats.py"), "--quick", "--model", str(tiny_model),
                           "--dtype", "bf16", "--limit", "40", "--out", str(out), "--scratch", str(tmp_path / "s"),
                           "--example-reads", "5", "--sixteen-train", "16", "--shard-size", "16"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "formats.json").read_text())
    names = ["probecache", *FORMATS]
    assert result["formats_measured"] == names
    storage, extraction, training = result["storage"], result["extraction"], result["training"]
    for name in names:
        assert storage["bytes"][name] > 0
        values = [*extraction["overhead_ratios"][name], *storage["example_s"][name], *storage["layer_s"][name],
                  *storage["epoch_s"][name], *training["one_variant_s"][name], training["sixteen_separate_s"][name]]
        assert values and all(math.isfinite(v) and v > 0 for v in values), (name, values)
        assert np.isfinite(storage["bytes"][name] / storage["bytes"]["probecache"])
    assert training["sixteen_shared_s"]["probecache"] > 0
    assert training["sixteen_subset"] and training["sixteen_train_examples"] == 16  # shard 0 of 16 examples
    assert list((tmp_path / "s").iterdir()) == []  # everything written was deleted
    assert "| probecache |" in proc.stdout and "### Training" in proc.stdout
