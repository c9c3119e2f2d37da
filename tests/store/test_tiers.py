"""Value tiers (store/tiers.py): identity, every read API on a lossy store, verify, and the documented error
bounds on real SmolLM2-135M activations (massive-activation channel included; marked slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from probecache.extract.config import ExtractConfig
from probecache.extract.errors import ExtractError
from probecache.extract.run import extract
from probecache.store.codecs import bf16_bits_to_float32
from probecache.store.reader import open_store
from probecache.store.segment import SegmentShape, SegmentWriter
from probecache.store.tiers import SCALE_ARRAY, TierError, dequantize, parse_tier, scale_rows
from probecache.store.verify import verify_store
from probecache.train.loaders import TokenStream, load_pooled

QUANTIZED = ["fp8-e4m3", "fp8-e5m2", "int8", "int7"]


def within_bound(tier: str, exact: np.ndarray, got: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per value: |got - exact| within the tier's documented bound (store/tiers.py error_bound) plus the final
    rounding to bf16 (half an ulp: at most 2^-8 relative). ``scale`` broadcasts against the values (L, n, d)."""
    x, y = exact.astype(np.float64), got.astype(np.float64)
    if tier == "fp8-e4m3":
        bound = 2.0**-4 * np.abs(x) + scale * 2.0**-10
    elif tier == "fp8-e5m2":
        bound = 2.0**-3 * np.abs(x) + scale * 2.0**-17
    elif tier.startswith("int"):
        bound = scale / 2
    else:  # mantissa-K
        bound = 2.0 ** -(int(tier.split("-")[1]) + 1) * np.abs(x)
    bound = bound + 2.0**-8 * np.abs(y)
    return np.abs(y - x) <= bound + 1e-30


def block_scales(tier: str, exact: np.ndarray) -> np.ndarray:
    """The scales the writer derives for (L, T, d) float32 values, broadcast to (L, T, d)."""
    L, T, d = exact.shape
    if tier.startswith("fp8"):
        top = 448.0 if tier == "fp8-e4m3" else 57344.0
        out = np.empty_like(exact)
        for b in range(0, T, 1024):
            out[:, b : b + 1024] = np.abs(exact[:, b : b + 1024]).max(axis=1, keepdims=True) / top
        return out
    if tier.startswith("int"):
        top = parse_tier(tier).int_max
        return np.broadcast_to(np.abs(exact).max(axis=2, keepdims=True) / top, exact.shape)
    return np.zeros_like(exact)


# ---- tier names, config and identity (tiny model) ---------------------------------------------------------


def test_tier_names_parse_and_bad_ones_say_what_is_valid():
    assert parse_tier("FP8-E4M3").name == "fp8-e4m3" and parse_tier("mantissa-0").mantissa_bits == 0
    for bad in ("fp4", "mantissa-7", "int3", "int9", ""):
        with pytest.raises(TierError, match="lossless, mantissa-K"):  # a StoreError: one line from the CLI
            parse_tier(bad)


def test_mantissa_bits_is_an_alias_and_a_conflict_is_one_line():
    assert ExtractConfig(mantissa_bits=3).value_tier().name == "mantissa-3"
    assert ExtractConfig(tier="mantissa-3", mantissa_bits=3).value_tier().name == "mantissa-3"
    with pytest.raises(ExtractError, match="drop one of it and --tier fp8-e4m3"):
        ExtractConfig(tier="fp8-e4m3", mantissa_bits=3).validate()
    with pytest.raises(ExtractError, match="--tier: unknown value tier 'fp9'"):
        ExtractConfig(tier="fp9").validate()


def test_store_id_changes_with_the_tier_and_the_alias_keeps_it(extract_config):
    ids = {tier: extract(extract_config(dtype="bf16", tier=tier)).store_id
           for tier in ["lossless", "mantissa-4", *QUANTIZED]}
    assert len(set(ids.values())) == len(ids)
    assert extract(extract_config(dtype="bf16", mantissa_bits=4)).store_id == ids["mantissa-4"]
    for tier, store_id in ids.items():
        store = open_store(extract(extract_config(dtype="bf16", tier=tier)).store_path)
        assert store.store_id == store_id and store.tier.name == tier and store.summary()["tier"] == tier
        assert store.info["identity"].get("tier") == (tier if tier in QUANTIZED else None)


def test_old_stores_without_a_tier_read_as_lossless_or_mantissa():
    from probecache.store.tiers import store_tier

    assert store_tier({"identity": {"mantissa_bits": None}}).name == "lossless"
    assert store_tier({"identity": {"mantissa_bits": 4}}).name == "mantissa-4"


@pytest.mark.parametrize("tier", QUANTIZED)
def test_a_lossy_store_reads_through_every_api_and_verifies(extract_config, tier):
    exact = open_store(extract(extract_config(dtype="bf16")).store_path)
    lossy = open_store(extract(extract_config(dtype="bf16", tier=tier)).store_path)
    assert verify_store(lossy.path).ok, verify_store(lossy.path).problems
    for mine, theirs in zip(exact.segments(), lossy.segments(), strict=True):  # scales are per segment block
        x = exact.read_tokens(mine).float().numpy()  # (L, T, d)
        got = lossy.read_tokens(theirs)
        assert got.dtype == torch.bfloat16 and within_bound(tier, x, got.float().numpy(), block_scales(tier, x)).all()
    rows = lossy.manifest(columns=["example_id", "segment", "token_offset", "n_tokens"]).to_pylist()
    for r in rows:
        b = lossy.hidden(r["example_id"])
        seg = lossy.read_tokens(r["segment"], r["token_offset"], r["token_offset"] + r["n_tokens"])
        assert torch.equal(b, seg) and b.shape == exact.hidden(r["example_id"]).shape
        assert lossy.hidden(r["example_id"], layers=[0, 2]).equal(b[[0, 2]])
    # pooled arrays stay lossless in the 8-bit tiers
    assert torch.equal(exact.mean(), lossy.mean()) and torch.equal(exact.last(), lossy.last())
    segment = lossy.segments()[0]
    assert torch.equal(exact.read_pooled(exact.segments()[0], "last"), lossy.read_pooled(segment, "last"))
    stored = lossy.read_tokens(segment, 3, 40, layers="1-2", decode=False)  # (2, 37, d) bf16 bits, decoded codes
    assert stored.dtype == np.uint16 and stored.shape[:2] == (2, 37)
    assert torch.equal(lossy.read_tokens(segment, 3, 40, layers="1-2"), lossy.read_tokens(segment)[1:3, 3:40])
    assert lossy.segment_array(segment).dtype == (np.int8 if tier.startswith("int") else np.uint8)
    assert lossy.segment_array(segment, SCALE_ARRAY).dtype == np.float32
    # the train loaders buffer decode=False values and decode them later: same batches as decoding at once
    batches = list(TokenStream(lossy, "train", layers=[1], batch_size=4, seed=0).epoch(0))
    for batch in batches:
        for b, eid in enumerate(batch.example_ids):
            n = int(batch.mask[b].sum())
            assert torch.equal(batch.hidden[b, :, :n], lossy.hidden(eid, layers=[1]).float())
    assert load_pooled(lossy, "train").x.shape[0] == sum(len(b) for b in batches)


@pytest.mark.parametrize("tier", ["fp8-e4m3", "int7"])
def test_the_documented_foreign_decoding_matches_the_reader(extract_config, tier):
    """docs/STORE_FORMAT.md "Read it without probecache": zarr + ml_dtypes only, the attributes and the formula."""
    import ml_dtypes

    store = open_store(extract(extract_config(dtype="bf16", tier=tier)).store_path)
    for segment in store.segments():
        hidden, scale = store.segment_array(segment), store.segment_array(segment, SCALE_ARRAY)
        assert hidden.attrs["tier"] == tier and "hidden_scale" in hidden.attrs["decoding"]
        codes, s = hidden[:], scale[:]
        t = np.arange(codes.shape[1])
        if tier.startswith("fp8"):
            h = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * s[:, t // 1024, :]
        else:
            h = codes.astype(np.float32) * s[:, t, None]
        assert np.array_equal(h.astype(ml_dtypes.bfloat16).view(np.uint16), store.read_tokens(segment, decode=False))


def test_store_info_names_the_tier(extract_config):
    from typer.testing import CliRunner

    from probecache.cli import app

    path = extract(extract_config(dtype="bf16", tier="int8")).store_path
    out = CliRunner().invoke(app, ["store", "info", str(path)])
    assert out.exit_code == 0 and "int8 values" in out.output
    info = json.loads(CliRunner().invoke(app, ["store", "info", str(path), "--json"]).output)
    assert info["tier"] == "int8"


# ---- error bounds on real SmolLM2-135M activations (slow) ---------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_states(tmp_path_factory):
    """A lossless SmolLM2-135M store of 48 Rotten Tomatoes reviews in one shard (> 1024 tokens: two fp8 scale
    blocks) and its states (L+1, T, d) as stored bf16 bits."""
    root = tmp_path_factory.mktemp("smollm2")
    config = dict(model="smollm2-135m", dataset="rotten_tomatoes", splits=("train",), limit=48, shard_size=64,
                  dtype="bf16", device="cpu", root=str(root), progress=False)
    store = open_store(extract(ExtractConfig(**config)).store_path)
    bits = store.read_tokens(store.segments()[0], decode=False)  # (31, T, 576) uint16
    return config, store, bits


@pytest.mark.slow
def test_smollm2_has_the_massive_channel_the_scales_must_survive(smollm2_states):
    _, _, bits = smollm2_states
    x = bf16_bits_to_float32(bits)
    assert x.shape[1] > 1024 and np.abs(x[5:26]).max() > 1e4  # layers 5-25: one channel at ~2.7e4


@pytest.mark.slow
@pytest.mark.parametrize("tier", [*QUANTIZED, "int4", "mantissa-0", "mantissa-3"])
def test_each_codec_round_trips_within_its_bound_on_smollm2(smollm2_states, tier, tmp_path):
    _, _, bits = smollm2_states
    exact = bf16_bits_to_float32(bits)  # (L, T, d)
    L, T, d = bits.shape
    t = parse_tier(tier)
    if t.quantized:  # written and read back as the segment writer and the reader do it, block by block
        writer = SegmentWriter(tmp_path / "seg", SegmentShape(L, d, T, 1, "bfloat16", tier=tier))
        writer.append(bits, exact.mean(axis=1))
        writer.close()
        group = zarr.open_group(str(tmp_path / "seg"), mode="r")
        got_bits = dequantize(group["hidden"][:], group[SCALE_ARRAY][:, scale_rows(t, 0, T)], 0, "bfloat16", t)
        # a read starting mid-block decodes the same values
        part = dequantize(group["hidden"][:, 1000:1100], group[SCALE_ARRAY][:, scale_rows(t, 1000, 1100)], 1000,
                          "bfloat16", t)
        assert np.array_equal(part, got_bits[:, 1000:1100])
    else:
        from probecache.store.codecs import round_mantissa

        got_bits = round_mantissa(bits, t.mantissa_bits)
    got = bf16_bits_to_float32(got_bits)
    ok = within_bound(tier, exact, got, block_scales(tier, exact))
    assert ok.all(), f"{(~ok).sum()} values out of bound, worst at {np.unravel_index(np.argmax(~ok), ok.shape)}"
    assert np.isfinite(got).all()


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["fp8-e4m3", "int7"])
def test_a_lossy_smollm2_store_matches_the_lossless_one_within_bound(smollm2_states, tier):
    config, exact, bits = smollm2_states
    lossy = open_store(extract(ExtractConfig(**{**config, "tier": tier})).store_path)
    assert lossy.store_id != exact.store_id and verify_store(lossy.path).ok
    x = bf16_bits_to_float32(bits)
    got = lossy.read_tokens(lossy.segments()[0]).float().numpy()  # (L, T, d) through the public API
    assert within_bound(tier, x, got, block_scales(tier, x)).all()
    assert lossy.summary()["bytes_stored"] < exact.summary()["bytes_stored"] / 1.5
    assert torch.equal(lossy.mean(), exact.mean())
