"""How tensors become stored bytes and back.

zarr-python 3 has no bfloat16 dtype, so bf16 activations are stored as their raw bits in uint16 with the
attribute ``logical_dtype = "bfloat16"``: zero-copy views both ways, and never routed through fp16 (LLM
activations reach ~10^4, which fp16 would clip or round badly). fp16 and fp32 models store their own dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from numcodecs import Blosc
from zarr.codecs import BloscCodec

# logical dtype name -> (torch dtype, numpy storage dtype)
LOGICAL_DTYPES: dict[str, tuple[torch.dtype, type[np.generic]]] = {
    "bfloat16": (torch.bfloat16, np.uint16),
    "float16": (torch.float16, np.float16),
    "float32": (torch.float32, np.float32),
}


def logical_dtype_name(dtype: torch.dtype) -> str:
    for name, (torch_dtype, _) in LOGICAL_DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise ValueError(f"unsupported activation dtype {dtype}: use bf16, fp16 or fp32")


def storage_dtype(logical: str) -> type[np.generic]:
    return LOGICAL_DTYPES[logical][1]


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array that is written (a view, no copy, for contiguous input)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(a: np.ndarray, logical: str) -> torch.Tensor:
    """Stored numpy array -> torch tensor in the logical dtype (zero-copy for contiguous input)."""
    a = np.ascontiguousarray(a)
    if logical == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of bf16 bits (uint16) to float32: bf16 is the top half of an fp32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_mantissa(bits: np.ndarray, keep_bits: int) -> np.ndarray:
    """Optional lossy knob: round bf16 bits (uint16) to ``keep_bits`` of the 7 mantissa bits, nearest-even.

    Zeroed low bits make byte-shuffled zstd far more effective (k = 4: ~1.98x vs 1.45x lossless).
    """
    if not 0 <= keep_bits < 7:
        raise ValueError("mantissa bits must be in 0..6 (7 = lossless, pass None)")
    drop = 7 - keep_bits
    x = bits.astype(np.uint32)
    half = np.uint32(1 << (drop - 1))
    lsb = (x >> drop) & 1  # ties go to even
    rounded = ((x + half - 1 + lsb) >> drop) << drop
    # never round a finite value into inf/nan: keep the truncated value if the exponent would overflow
    exponent_all_ones = (rounded & 0x7F80) == 0x7F80
    truncated = (x >> drop) << drop
    out = np.where(exponent_all_ones & ((x & 0x7F80) != 0x7F80), truncated, rounded)
    return out.astype(np.uint16)


# Measured best on bf16 activations (design.md §4): zstd level 1, byte shuffle, 1 MiB blocks. ~1.45x
# lossless at ~0.6 GB/s encode per core; bitshuffle, higher levels and the default blocksize all do worse.
ACTIVATION_BLOSC = {"cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": 1 << 20}


def round_example(states, keep_bits: int) -> tuple[list[np.ndarray], np.ndarray]:
    """mantissa-K for one example, as extraction and `store convert` both do it: each layer's (n, d) bf16 bits
    rounded, and the example's (L+1, d) float32 mean recomputed from the rounded values (so ``mean`` is the mean
    of what is stored)."""
    rounded = [round_mantissa(h, keep_bits) for h in states]
    return rounded, np.stack([bf16_bits_to_float32(h).mean(axis=0) for h in rounded])


def activation_codec() -> BloscCodec:
    """The codec as zarr's array metadata declares it (readers decode through zarr with this)."""
    return BloscCodec(**ACTIVATION_BLOSC)


def activation_blosc(typesize: int) -> Blosc:
    """The identical codec as numcodecs applies it, for the writer's own whole-shard encoding."""
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
    return Blosc(cname=ACTIVATION_BLOSC["cname"], clevel=ACTIVATION_BLOSC["clevel"],
                 shuffle=shuffle[ACTIVATION_BLOSC["shuffle"]], blocksize=ACTIVATION_BLOSC["blocksize"],
                 typesize=typesize)
