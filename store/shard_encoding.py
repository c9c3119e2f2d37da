"""Encoding one zarr v3 shard of ``hidden`` ourselves, byte-identical to zarr-python's own writer.

Why: zarr-python's sharded write path runs every inner chunk through asyncio tasks, an event-loop thread
and a fill-value comparison; on a 2-core machine that machinery cost ~0.4 core-s per 0.5 GB on top of the
~0.8 core-s blosc itself needs, and every core-second taken from the forward pass stalls it (its OpenMP
threads wait for each other). Encoding a whole shard here is one blosc call per inner chunk plus an index.

The layout follows the sharding_indexed codec (zarr v3 spec, index_location "end"): the encoded inner
chunks in C order, then an index of (offset, nbytes) uint64 little-endian pairs per inner chunk, 2^64-1
for chunks outside the array, followed by the index's crc32c. Inner chunks that cross the array's end are
padded with the fill value first, as zarr does. tests/store/test_shard_encoding.py checks the bytes
against zarr's own output; reads always go through zarr.
"""

from __future__ import annotations

from concurrent.futures import Executor

import google_crc32c
import numpy as np
from numcodecs.abc import Codec

MISSING = np.uint64(2**64 - 1)


def encode_shard(block: np.ndarray, chunk_tokens: int, shard_tokens: int, codec: Codec, fill_value: int = 0,
                 pool: Executor | None = None) -> bytes:
    """``block`` (L+1, n, d) with n <= shard_tokens, the shard's in-bounds tokens -> the shard file's bytes.

    Inner chunks are (1, chunk_tokens, d). ``pool`` optionally encodes chunks in parallel (blosc releases
    the GIL); the result does not depend on it.
    """
    n_layers, n, d = block.shape
    per_layer = shard_tokens // chunk_tokens
    index = np.full((n_layers, per_layer, 1, 2), MISSING, dtype="<u8")
    chunks, where = [], []
    for layer in range(n_layers):
        for j in range(per_layer):
            start = j * chunk_tokens
            if start >= n:  # entirely past the array's end: not stored
                continue
            chunk = block[layer, start : start + chunk_tokens]
            if chunk.shape[0] < chunk_tokens:
                padded = np.full((chunk_tokens, d), fill_value, dtype=block.dtype)
                padded[: chunk.shape[0]] = chunk
                chunk = padded
            chunks.append(np.ascontiguousarray(chunk))
            where.append((layer, j))
    encoded = list(pool.map(codec.encode, chunks)) if pool is not None else [codec.encode(c) for c in chunks]
    offset = 0
    for (layer, j), payload in zip(where, encoded, strict=True):
        index[layer, j, 0] = (offset, len(payload))
        offset += len(payload)
    index_bytes = index.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
    return b"".join([*encoded, index_bytes, crc])
