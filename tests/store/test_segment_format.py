"""What a segment says about itself: dimension names, group attributes, opt-in token ids; old segments stay readable."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from probecache.store.errors import StoreError
from probecache.store.segment import DIMENSIONS, LAYER_MEANING, SegmentShape, SegmentWriter
from probecache.store.verify import verify_store

MAX_TOKENS = 24  # below the longest review (64 bytes): some examples are truncated, their kept ids must be stored


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model, reviews_csv_writer, extract_tiny_store):
    """The same reviews extracted with logits and token ids, and without token ids."""
    tmp = tmp_path_factory.mktemp("segment-format")
    data = reviews_csv_writer(tmp / "reviews.csv")
    with_ids = extract_tiny_store(tiny_model, tmp / "stores", data, logits=True, store_token_ids=True,
                                  max_tokens=MAX_TOKENS)
    without = extract_tiny_store(tiny_model, tmp / "stores", data, logits=True, max_tokens=MAX_TOKENS)
    with open(data, newline="") as f:
        texts = {row["id"]: row["text"] for row in csv.DictReader(f)}
    return with_ids, without, texts


def _zarr_json(path) -> dict:
    return json.loads(path.read_text())


def test_every_array_names_its_dimensions_and_the_group_says_what_values_mean(stores):
    store, _, _ = stores
    segments = store.segments()
    assert len(segments) == 4  # 30 examples in shards of 8
    for shard_id, segment in enumerate(segments):
        folder = store.layout.segment(segment)
        attrs = _zarr_json(folder / "zarr.json")["attributes"]
        assert attrs["store_id"] == store.store_id and attrs["shard_id"] == shard_id
        assert attrs["probecache_format_version"] == store.info["format_version"]
        assert attrs["logical_dtype"] == "bfloat16" and "uint16" in attrs["decoding"]
        assert attrs["layers"] == LAYER_MEANING and attrs["n_layers"] == store.n_layers
        rows = store.manifest(filter=pc.field("segment") == segment)
        assert attrs["n_examples"] == rows.num_rows and attrs["n_tokens"] == sum(rows["n_tokens"].to_pylist())
        arrays = {p.parent.name for p in folder.glob("*/zarr.json")}
        assert arrays == {"hidden", "mean", "last", "logits", "token_ids"}
        for name in arrays:
            meta = _zarr_json(folder / name / "zarr.json")
            assert tuple(meta["dimension_names"]) == DIMENSIONS[name], name
            assert meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}


def test_commit_record_covers_every_file_and_verify_is_clean(stores):
    for store in stores[:2]:
        assert verify_store(store.path).ok
        for segment in store.segments():
            folder = store.layout.segment(segment)
            on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
            assert set(store.segment_files(segment)) == on_disk


def test_token_ids_are_the_kept_ids_aligned_with_hidden(stores, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, _, texts = stores
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    embed = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).get_input_embeddings()
    table = store.manifest(columns=["example_id", "n_tokens", "truncated", "text_sha256"])
    assert any(table["truncated"].to_pylist())
    for eid, n in zip(table["example_id"].to_pylist(), table["n_tokens"].to_pylist(), strict=True):
        ids = store.token_ids(eid)
        assert ids.dtype == torch.int32 and ids.shape == (n,)
        assert ids.tolist() == tokenizer(texts[eid])["input_ids"][:MAX_TOKENS]
        with torch.no_grad():  # layer 0 is the embedding of each stored id: ids and states line up token by token
            assert torch.equal(store.hidden(eid, layers=0)[0], embed(ids.long()))


def test_token_ids_are_opt_in_and_part_of_the_identity(stores):
    with_ids, without, _ = stores
    assert with_ids.store_id != without.store_id
    # off: the capture set has no token_ids key at all, so stores extracted before the option keep their id
    assert "token_ids" not in without.info["identity"]["capture"]
    assert with_ids.info["identity"]["capture"]["token_ids"] is True
    assert with_ids.info["capture"]["token_ids"] is True
    assert not any((without.layout.segment(s) / "token_ids").exists() for s in without.segments())
    eid = without.manifest(columns=["example_id"])["example_id"][0].as_py()
    with pytest.raises(StoreError, match="--store-token-ids"):
        without.token_ids(eid)


def test_segments_without_names_or_attributes_stay_readable(tmp_path, tiny_model, tiny_csv, extract_tiny_store,
                                                            monkeypatch):
    """A store written before dimension names and group attributes existed reads and verifies as before."""
    from probecache.store import segment as segment_module

    monkeypatch.setattr(segment_module, "segment_attributes", lambda *args, **kwargs: {})
    monkeypatch.setattr(segment_module, "DIMENSIONS", dict.fromkeys(DIMENSIONS))
    old = extract_tiny_store(tiny_model, tmp_path / "old", tiny_csv)
    monkeypatch.undo()
    new = extract_tiny_store(tiny_model, tmp_path / "new", tiny_csv)
    assert old.store_id == new.store_id
    meta = _zarr_json(old.layout.segment(old.segments()[0]) / "hidden" / "zarr.json")
    assert "dimension_names" not in meta or meta["dimension_names"] is None
    assert verify_store(old.path).ok
    ids = new.manifest(columns=["example_id"])["example_id"].to_pylist()
    for eid in ids:
        assert torch.equal(old.hidden(eid), new.hidden(eid))
    assert torch.equal(old.mean(ids), new.mean(ids)) and torch.equal(old.last(ids), new.last(ids))


def test_writer_refuses_token_ids_that_do_not_match_the_states(tmp_path):
    shape = SegmentShape(n_layers=2, hidden_size=8, n_tokens=3, n_examples=1, logical_dtype="float32",
                         token_ids=True)
    writer = SegmentWriter(tmp_path / "seg", shape)
    hidden = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match="3 ids"):
        writer.append(hidden, np.zeros((2, 8), np.float32), token_ids=[1, 2])
    with pytest.raises(ValueError, match="0..2"):
        writer.append(hidden, np.zeros((2, 8), np.float32), token_ids=[1, 2, 2**31])


def test_no_private_zarr_imports_in_probecache():
    """zarr.core is private (not covered by zarr's versioning): the package uses only public zarr API, so any zarr
    3.x that pyproject admits works. bench/segment_write.py imports it on purpose, to measure the old writer."""
    import ast
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    # the installed packages' folders, from pyproject's package-dir ("probecache.store" = "store", ...)
    folders = re.findall(r'"probecache[.\w]*" = "(\w+)"', (repo / "pyproject.toml").read_text())
    private = []
    for folder in folders:
        for source in sorted((repo / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text(), str(source))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                private += [f"{source.relative_to(repo)}: {n}" for n in names if n.startswith("zarr.core")]
    assert folders and not private, private
