"""Value tiers: how ``hidden``'s values are stored, chosen at extraction and recorded in the store identity.

    lossless     the model's own values, bit for bit (bf16 as uint16 bits)                 the default
    mantissa-K   bf16 with the mantissa rounded to K of its 7 bits (K = 0..6), nearest-even; still bf16 bits
    fp8-e4m3     uint8 holding float8_e4m3fn bits, times a float32 scale per (layer, 1024-token block, channel)
    fp8-e5m2     the same with float8_e5m2 (2 mantissa bits, wider range)
    int8         int8 codes times a float32 absmax scale per (layer, token)
    intK         K = 4..7: the same with codes in +-(2^(K-1) - 1), still stored as int8 (zstd packs the unused
                 high bits: int7 ~3.7 bits per value on SmolLM2 vs int8's ~4.6)

Scales are absmax / format max, computed by the writer from the 1024 tokens of each zarr shard it encodes (a
block: the writer holds nothing larger) and stored beside the codes as the segment array ``hidden_scale``:

    fp8   hidden_scale (L+1, n_blocks, d)   value[l, t, c] = fp8(hidden[l, t, c]) * hidden_scale[l, t // 1024, c]
    intK  hidden_scale (L+1, T)             value[l, t, c] = hidden[l, t, c] * hidden_scale[l, t]

Why these scale axes (measured on SmolLM2-135M, docs/BENCHMARKS.md "Storage tiers"): SmolLM2 has a channel at
~2.7e4 on a sentence's first token in layers 5-25. A per-channel scale is harmless for fp8 (its exponent still
resolves that channel's ordinary values at ~1e-2 of the scale), but wrecks int8 (a 211-wide step zeroes the
channel everywhere else). int8's per-token absmax keeps each token's direction (mean per-token relative
error ~3%) but rounds small channels coarsely. Pooled arrays (``mean`` float32, ``last``) stay lossless in the
fp8 and int8 tiers (they are ~1/n_tokens of the bytes); the mantissa tier rounds them as it always has.

Readers get the logical dtype back (bf16 values rounded to nearest from the float32 decode).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import StoreError

BLOCK_TOKENS = 1024  # tokens per fp8 scale block: the writer's zarr shard (segment.TOKENS_PER_ZARR_SHARD)
SCALE_ARRAY = "hidden_scale"
_FP8 = {"fp8-e4m3": ml_dtypes.float8_e4m3fn, "fp8-e5m2": ml_dtypes.float8_e5m2}
TIER_HELP = "lossless, mantissa-K (K = 0..6), fp8-e4m3, fp8-e5m2 or intK (K = 4..8)"


@dataclass(frozen=True)
class Tier:
    name: str  # "lossless" | "mantissa-K" | "fp8-e4m3" | "fp8-e5m2" | "intK"

    @property
    def kind(self) -> str:
        """lossless | mantissa | fp8 | int"""
        return "int" if self.name.startswith("int") else self.name.split("-")[0]

    @property
    def int_max(self) -> int | None:
        """intK's largest code, 2^(K-1) - 1 (int8: 127)."""
        return 2 ** (int(self.name[3:]) - 1) - 1 if self.kind == "int" else None

    @property
    def mantissa_bits(self) -> int | None:
        return int(self.name.split("-")[1]) if self.kind == "mantissa" else None

    @property
    def quantized(self) -> bool:
        """True when ``hidden`` holds 8-bit codes plus ``hidden_scale`` instead of values in the logical dtype."""
        return self.kind in ("fp8", "int")

    @property
    def storage(self) -> type[np.generic] | None:
        """numpy dtype of ``hidden`` for quantized tiers (None: the logical dtype's storage, as ever)."""
        return {"fp8": np.uint8, "int": np.int8}.get(self.kind)

    @property
    def decoding(self) -> str | None:
        """How a foreign reader decodes ``hidden`` (the array's ``decoding`` attribute); None for unquantized."""
        if self.kind == "fp8":
            fmt = _FP8[self.name].__name__
            return (f"uint8 holding {fmt} bits: value[l, t, c] = hidden[l, t, c].view(ml_dtypes.{fmt})"
                    f".astype(float32) * hidden_scale[l, t // {BLOCK_TOKENS}, c]")
        if self.kind == "int":
            return (f"int8 codes in +-{self.int_max}: value[l, t, c] = hidden[l, t, c].astype(float32) * "
                    "hidden_scale[l, t]")
        return None


class TierError(StoreError):
    """A tier name that is not one of the tiers (a user error: one line listing the valid ones)."""


def parse_tier(name: str) -> Tier:
    """A tier name as given on the command line; a bad one is a one-line TierError listing the valid ones."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"mantissa-(\d+)", text)
    if text in ("lossless", *_FP8) or re.fullmatch(r"int[4-8]", text) or (m and 0 <= int(m.group(1)) <= 6):
        return Tier(text)
    raise TierError(f"unknown value tier {name!r}: use {TIER_HELP}")


def store_tier(info: dict) -> Tier:
    """The tier of a store from its store.json; stores from before tiers were recorded are lossless or mantissa-K."""
    if info.get("tier"):
        return parse_tier(info["tier"])
    bits = info.get("identity", {}).get("mantissa_bits")
    return Tier("lossless" if bits is None else f"mantissa-{bits}")


def with_tier(identity: dict, tier: Tier) -> dict:
    """A store identity with its value tier set to ``tier``: the one rule both `extract --tier` (extract/prepare.py)
    and `store convert` (store/convert.py) use, so a converted store has the id a direct extraction would get.
    mantissa-K keeps the key it always had; the ``tier`` key is present only for quantized tiers, so lossless
    and mantissa stores keep the ids they had before tiers existed."""
    out = {k: v for k, v in identity.items() if k != "tier"}
    out["mantissa_bits"] = tier.mantissa_bits
    if tier.quantized:
        out["tier"] = tier.name
    return out


def to_float32(stored: np.ndarray, logical: str) -> np.ndarray:
    """Stored values of an unquantized array (bf16 as uint16 bits) -> a new float32 array, exactly."""
    if logical == "bfloat16":
        wide = stored.astype(np.uint32)
        wide <<= 16  # in place: the writer quantizes every block, and a 2-core host has no time for temporaries
        return wide.view(np.float32)
    return stored.astype(np.float32)


def from_float32(values: np.ndarray, logical: str) -> np.ndarray:
    """float32 -> the logical dtype's stored form (bf16 as uint16 bits, rounded to nearest even)."""
    if logical == "bfloat16":
        return values.astype(ml_dtypes.bfloat16).view(np.uint16)
    return values.astype(np.float16 if logical == "float16" else np.float32)


def _absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """max |x| along ``axis`` without materialising |x| (two reductions instead of a full-size temporary)."""
    return np.maximum(x.max(axis=axis), -x.min(axis=axis))


def quantize(stored: np.ndarray, logical: str, tier: Tier) -> tuple[np.ndarray, np.ndarray]:
    """One block of ``hidden`` (L+1, n, d) in the logical dtype's stored form -> (codes (L+1, n, d), scale):
    fp8 scale (L+1, d) per channel over the block's tokens, intK scale (L+1, n) per token."""
    x = to_float32(stored, logical)  # (L+1, n, d), a fresh array: scaled in place below
    if tier.kind == "fp8":
        fmt = _FP8[tier.name]
        top = float(ml_dtypes.finfo(fmt).max)
        scale = _absmax(x, 1) / top  # (L+1, d)
        scale[~(scale > 0)] = 1.0  # an all-zero channel: any scale decodes to 0
        x /= scale[:, None, :]
        # clip: float rounding of x / scale can exceed the max by an ulp, and e4m3fn turns overflow into NaN
        np.clip(x, -top, top, out=x)
        return x.astype(fmt).view(np.uint8), scale.astype(np.float32)
    if tier.kind == "int":
        top = tier.int_max
        scale = _absmax(x, 2) / top  # (L+1, n)
        scale[~(scale > 0)] = 1.0
        x /= scale[:, :, None]
        np.rint(x, out=x)
        np.clip(x, -top, top, out=x)
        return x.astype(np.int8), scale.astype(np.float32)
    raise ValueError(f"tier {tier.name} stores values, not codes")


@functools.cache
def _fp8_table(name: str) -> np.ndarray:
    """float32 value of each of the 256 fp8 bit patterns: a gather decodes ~3x faster than ml_dtypes' cast."""
    return np.arange(256, dtype=np.uint8).view(_FP8[name]).astype(np.float32)


def dequantize(codes: np.ndarray, scale: np.ndarray, start: int, logical: str, tier: Tier) -> np.ndarray:
    """Codes of tokens [start, start + n) (L', n, d) and the scale rows covering them -> the logical dtype's stored
    form (L', n, d). ``scale`` is fp8's (L', blocks from start // 1024, d) or int8's (L', n)."""
    n = codes.shape[1]
    if tier.kind == "fp8":
        block = (np.arange(start, start + n) // BLOCK_TOKENS) - start // BLOCK_TOKENS  # (n,) block of each token
        values = _fp8_table(tier.name)[codes] * scale[:, block, :]  # (L', n, d)
    elif tier.kind == "int":
        values = codes.astype(np.float32) * scale[:, :, None]  # (L', n, d)
    else:
        raise ValueError(f"tier {tier.name} stores values, not codes")
    return from_float32(values, logical)


def scale_rows(tier: Tier, start: int, stop: int) -> slice:
    """The slice of ``hidden_scale``'s second axis that covers tokens [start, stop)."""
    if tier.kind == "fp8":
        return slice(start // BLOCK_TOKENS, -(-stop // BLOCK_TOKENS) if stop > start else start // BLOCK_TOKENS + 1)
    return slice(start, stop)


def error_bound(tier: Tier) -> str:
    """The documented per-value error of a tier, before the final rounding to the logical dtype."""
    return {
        "lossless": "exact",
        "mantissa": "|err| <= 2^-(K+1) |x| (half an ulp at K mantissa bits; never rounds into inf)",
        "fp8": ("|err| <= 2^-4 |x| + scale * 2^-10 (e4m3) or 2^-3 |x| + scale * 2^-17 (e5m2), "
                "scale = block channel absmax / format max"),
        "int": "|err| <= scale / 2 = token absmax / (2^K - 2)",
    }[tier.kind]
