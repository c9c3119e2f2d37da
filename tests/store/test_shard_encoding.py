"""Our whole-shard encoder writes exactly the bytes zarr-python writes, and zarr reads them back."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zarr
from probecache.store.codecs import activation_blosc, activation_codec, to_storage
from probecache.store.segment import TOKENS_PER_CHUNK, TOKENS_PER_ZARR_SHARD, SegmentShape, SegmentWriter
from probecache.store.shard_encoding import encode_shard


def _activations(layers: int, tokens: int, d: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, tokens, d, generator=g) * torch.logspace(0, 3, layers).view(-1, 1, 1)
    return to_storage(x.to(torch.bfloat16))  # (L+1, T, d) uint16 bf16 bits


def _chunks_by_coordinate(shard: bytes, n_chunks: int) -> list[bytes | None]:
    """Each inner chunk's encoded bytes, in C order of coordinates (None = not stored), via the index."""
    index = np.frombuffer(shard[-(16 * n_chunks + 4) : -4], dtype="<u8").reshape(n_chunks, 2)
    return [None if off == 2**64 - 1 else shard[off : off + size] for off, size in index]


@pytest.mark.parametrize("tokens", [TOKENS_PER_ZARR_SHARD, 3 * TOKENS_PER_ZARR_SHARD + 300, 100, 256])
def test_chunks_and_index_equal_zarrs_own_sharded_write(tmp_path, tokens):
    """Every inner chunk byte-identical to zarr's, and the same index checksum scheme; zarr may lay the
    chunks out in another order inside the file (Morton order), which the index makes irrelevant."""
    data = _activations(3, tokens, 64)
    reference = zarr.create_array(str(tmp_path / "ref"), shape=data.shape, dtype="uint16",
                                  chunks=(1, TOKENS_PER_CHUNK, 64), shards=(3, TOKENS_PER_ZARR_SHARD, 64),
                                  compressors=activation_codec(), fill_value=0)
    reference[:] = data
    codec = activation_blosc(2)
    for k, t0 in enumerate(range(0, tokens, TOKENS_PER_ZARR_SHARD)):
        block = data[:, t0 : t0 + TOKENS_PER_ZARR_SHARD]
        ours = encode_shard(block, TOKENS_PER_CHUNK, TOKENS_PER_ZARR_SHARD, codec)
        theirs = (tmp_path / "ref" / "c" / "0" / str(k) / "0").read_bytes()
        n_chunks = 3 * TOKENS_PER_ZARR_SHARD // TOKENS_PER_CHUNK
        assert len(ours) == len(theirs)
        assert _chunks_by_coordinate(ours, n_chunks) == _chunks_by_coordinate(theirs, n_chunks)
        with ThreadPoolExecutor(2) as pool:  # parallel encoding changes nothing
            assert encode_shard(block, TOKENS_PER_CHUNK, TOKENS_PER_ZARR_SHARD, codec, pool=pool) == ours


@pytest.mark.parametrize("lengths", [[5, 700, 400, 1, 1024, 33], [1], [2048]])
def test_segment_writer_round_trips_through_zarr(tmp_path, lengths):
    n_layers, d = 4, 32
    examples = [_activations(n_layers, n, d, seed=i) for i, n in enumerate(lengths)]
    shape = SegmentShape(n_layers=n_layers, hidden_size=d, n_tokens=sum(lengths), n_examples=len(lengths),
                         logical_dtype="bfloat16")
    with ThreadPoolExecutor(2) as pool:
        writer = SegmentWriter(tmp_path / "seg", shape, pool=pool)
        for e in examples:
            writer.append(e, np.zeros((n_layers, d), np.float32))
        writer.close()
    hidden = zarr.open_group(str(tmp_path / "seg"), mode="r")["hidden"]
    assert np.array_equal(hidden[:], np.concatenate(examples, axis=1))
    assert np.array_equal(hidden[1:3, 3:900], np.concatenate(examples, axis=1)[1:3, 3:900])
