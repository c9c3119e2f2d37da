"""Shared-prefix dedup (``extract --share-prefixes``, store/prefixes.py): each distinct prompt prefix is stored once
per segment and readers put every example back together exactly.

The stores: the same 30 chat-format prompts (a fixed 60-byte instruction, so every prompt opens with ~70 identical
byte tokens on the tiny model's byte-level tokenizer) extracted with and without sharing, same plan and batches.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from probecache.manifests.schema import part_bytes, read_part
from probecache.store.prefixes import MIN_SHARED_TOKENS, PrefixMatcher, example_ranges
from probecache.store.verify import verify_store
from probecache.train.loaders import TokenStream
from typer.testing import CliRunner

from tests.conftest import TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")

INSTRUCTION = "Read this movie review and decide whether the critic liked the film: "


@pytest.fixture(scope="module")
def instructed_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("instructed") / "reviews.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "split"])
        for i, text in enumerate(TEXTS):
            split = "train" if i < 20 else "validation" if i < 25 else "test"
            w.writerow([f"r{i:02d}", INSTRUCTION + text, "pos" if i % 2 == 0 else "neg", split])
    return path


@pytest.fixture(scope="module")
def stores(tiny_model, instructed_csv, extract_tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-stores")
    common = dict(prompt_format="chat", store_token_ids=True, batch_tokens=400)
    return {"plain": extract_tiny_store(tiny_model, root, instructed_csv, **common),
            "shared": extract_tiny_store(tiny_model, root, instructed_csv, share_prefixes=True, **common),
            "root": root}


def ids(store) -> list[str]:
    return store.manifest(columns=["example_id"])["example_id"].to_pylist()


# ---- the matcher ------------------------------------------------------------------------------------------


def states_of(values: np.ndarray) -> list[np.ndarray]:
    """(L, n, d) uint16 -> L x (n, d), the form extraction hands the matcher."""
    return list(values)


def test_matcher_shares_the_bit_identical_prefix_and_never_the_last_token():
    rng = np.random.default_rng(0)
    ids_a = list(range(40))
    a = rng.integers(0, 2**16, (3, 40, 8), dtype=np.uint16)  # (L, n, d)
    matcher = PrefixMatcher(bytes_per_token=3 * 8 * 2)
    assert matcher.match(ids_a, states_of(a)) is None  # no source yet
    matcher.add_source(ids_a, states_of(a), offset=100)

    # the same 30 tokens then others: shares exactly the 30 whose ids and bits agree
    b = a[:, :35].copy()
    b[:, 30:] ^= 1
    share = matcher.match(ids_a[:30] + [99] * 5, states_of(b))
    assert (share.offset, share.tokens) == (100, 30)

    # an identical example keeps its last token of its own
    share = matcher.match(ids_a, states_of(a.copy()))
    assert share.tokens == 39

    # one flipped bit in one layer, one channel, stops the share right there
    c = a.copy()
    c[2, 25, 7] ^= 0x8000  # the sign bit: -x for x, or -0.0 for +0.0
    share = matcher.match(ids_a, states_of(c))
    assert share.tokens == 25 and matcher.stopped_by_bits == 1


def test_matcher_shares_nothing_below_the_minimum_or_across_token_ids():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2**16, (2, 40, 4), dtype=np.uint16)
    matcher = PrefixMatcher(bytes_per_token=16)
    matcher.add_source(list(range(40)), states_of(a), offset=0)
    short = a.copy()
    short[0, MIN_SHARED_TOKENS - 1] ^= 1  # bits agree on one position fewer than the minimum
    assert matcher.match(list(range(40)), states_of(short)) is None
    # same states, other token ids (never happens with a real model; the ids gate the comparison)
    assert matcher.match([7] + list(range(1, 40)), states_of(a.copy())) is None
    # too short to share anything: MIN tokens would leave no token of its own
    assert matcher.match(list(range(MIN_SHARED_TOKENS)), states_of(a[:, :MIN_SHARED_TOKENS].copy())) is None
    assert matcher.match(list(range(MIN_SHARED_TOKENS + 1)),
                         states_of(a[:, : MIN_SHARED_TOKENS + 1].copy())).tokens == MIN_SHARED_TOKENS


def test_matcher_compares_bits_not_float_values():
    a = np.zeros((1, 20, 2), dtype=np.float32)
    b = a.copy()
    b[0, 18, 1] = -0.0  # equal as floats, other bits
    matcher = PrefixMatcher(bytes_per_token=8)
    matcher.add_source(list(range(20)), states_of(a), offset=0)
    assert matcher.match(list(range(20)) + [1], states_of(np.concatenate([b, b[:, :1]], axis=1))).tokens == 18


def test_matcher_memory_is_bounded_by_its_sources_and_prefix_length():
    matcher = PrefixMatcher(bytes_per_token=1 << 20, max_sources=2)  # 1 MiB per token: the budget caps the prefix
    assert matcher.max_prefix == 128
    rng = np.random.default_rng(2)
    for k in range(3):
        matcher.add_source([k] * 200, [rng.integers(0, 9, (200, 4), dtype=np.uint16)], offset=k)
    assert len(matcher._sources) == 2 and all(s.bits.shape[1] == 128 for s in matcher._sources)


def test_example_ranges_put_the_prefix_first():
    assert example_ranges(50, 10) == [(50, 60)]
    assert example_ranges(50, 10, prefix_offset=3, prefix_tokens=4) == [(3, 7), (50, 56)]


# ---- stores -----------------------------------------------------------------------------------------------


def test_a_sharing_store_reads_back_equal_to_a_plain_one(stores):
    plain, shared = stores["plain"], stores["shared"]
    table = shared.manifest()
    prefix_tokens = table["prefix_tokens"].to_pylist()
    assert sum(s > 0 for s in prefix_tokens) >= len(prefix_tokens) - 2 * shared.info["plan"]["n_shards"]
    assert min(s for s in prefix_tokens if s) >= len(INSTRUCTION)  # the whole instruction at least
    summary = shared.summary()
    assert summary["n_tokens"] == plain.summary()["n_tokens"]
    assert summary["stored_tokens"] == summary["n_tokens"] - sum(prefix_tokens)
    for eid in ids(plain):
        assert torch.equal(shared.hidden(eid), plain.hidden(eid)), eid
        assert torch.equal(shared.hidden(eid, layers=[0, -1]), plain.hidden(eid, layers=[0, -1])), eid
        assert torch.equal(shared.token_ids(eid), plain.token_ids(eid)), eid
    assert torch.equal(shared.mean(), plain.mean()) and torch.equal(shared.last(), plain.last())
    assert "prefix_tokens" not in plain.manifest().column_names


@pytest.mark.parametrize("split", ["train", "test"])
def test_token_stream_batches_are_identical(stores, split):
    streams = [TokenStream(stores[k], split, batch_size=4, buffer_tokens=200, seed=3) for k in ("plain", "shared")]
    for a, b in zip(*(list(s.epoch(0)) for s in streams), strict=True):
        assert a.example_ids == b.example_ids
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.mask, b.mask) and torch.equal(a.y, b.y)


def test_the_store_id_records_sharing_only_when_on(stores):
    plain, shared = stores["plain"], stores["shared"]
    assert plain.store_id != shared.store_id
    assert shared.info["identity"]["capture"]["shared_prefixes"] is True
    assert "shared_prefixes" not in plain.info["identity"]["capture"]


def test_segments_hold_only_the_stored_tokens(stores):
    shared = stores["shared"]
    table = shared.manifest(columns=["segment", "n_tokens", "prefix_tokens"])
    for segment in shared.segments():
        mine = [n - s for seg, n, s in zip(*(table[c].to_pylist() for c in table.column_names), strict=True)
                if seg == segment]
        hidden = shared.segment_array(segment, "hidden")
        assert hidden.shape[1] == sum(mine) == hidden.attrs["n_tokens"]
        assert shared.segment_array(segment, "token_ids").shape == (sum(mine),)
        group = json.loads((shared.layout.segment(segment) / "zarr.json").read_text())["attributes"]
        assert group["n_tokens"] == sum(mine) and "prefix_offset" in group["shared_prefixes"]


def test_verify_is_clean_and_still_catches_damage(stores, tmp_path):
    import shutil

    shared = stores["shared"]
    assert verify_store(shared.path).ok, verify_store(shared.path).problems
    copy = tmp_path / shared.store_id
    shutil.copytree(shared.path, copy)
    segment = shared.segments()[0]
    chunk = copy / "segments" / segment / "hidden" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert any("crc32c" in p for p in verify_store(copy).problems)


def test_verify_catches_a_prefix_outside_any_full_example(stores, tmp_path):
    import shutil

    shared = stores["shared"]
    copy = tmp_path / shared.store_id
    shutil.copytree(shared.path, copy)
    part = copy / "manifests" / "part-00000.parquet"
    table, stats = read_part(part)
    rows = table.to_pylist()
    sharing = next(r for r in rows if r["prefix_tokens"])
    sharing["prefix_offset"] = sharing["token_offset"]  # points at its own tokens, not at a source
    part.write_bytes(part_bytes(rows, stats, with_prefixes=True))
    assert pq.read_schema(part).names[-2:] == ["prefix_offset", "prefix_tokens"]
    problems = verify_store(copy).problems
    assert any("shared prefixes are not inside an example stored in full" in p for p in problems), problems


def test_share_prefixes_needs_every_token(tiny_model, instructed_csv, tmp_path, one_line_error):
    from probecache.cli import app

    result = CliRunner().invoke(app, ["extract", "--dataset", f"csv:{instructed_csv}", "--model", str(tiny_model),
                                      "--root", str(tmp_path), "--no-progress", "--share-prefixes", "--tokens", "last"])
    one_line_error(result, "--share-prefixes", "--tokens all")


# ---- store convert ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "shares"), [
    ({"tier": "mantissa-4"}, True), ({"tier": "int7", "layers": "0,-1"}, True), ({"tokens": "last-3"}, False),
])
def test_convert_of_a_sharing_store_is_the_direct_extraction(stores, tiny_model, instructed_csv, extract_tiny_store,
                                                            tmp_path, options, shares):
    from probecache.store.convert import convert_store
    from probecache.store.reader import open_store

    shared = stores["shared"]
    converted = open_store(convert_store(shared.path, tmp_path, **options))
    direct = extract_tiny_store(tiny_model, tmp_path / "direct", instructed_csv, prompt_format="chat",
                                store_token_ids=True, batch_tokens=400, share_prefixes=shares, **options)
    assert converted.store_id == direct.store_id
    assert verify_store(converted.path).ok, verify_store(converted.path).problems
    assert ("prefix_tokens" in converted.manifest().column_names) is shares
    drop = ["segment"]
    assert converted.manifest().drop(drop).equals(direct.manifest().drop(drop))  # same rows, same sharing
    for eid in ids(direct):
        assert torch.equal(converted.hidden(eid), direct.hidden(eid)), eid
        assert torch.equal(converted.token_ids(eid), direct.token_ids(eid)), eid
    assert torch.equal(converted.mean(), direct.mean()) and torch.equal(converted.last(), direct.last())
