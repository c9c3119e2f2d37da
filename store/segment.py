"""Writing one segment: the zarr v3 group that holds one attempt of one shard.

Arrays (T_seg = total real tokens of the shard's examples, less shared prefixes with --share-prefixes
(store/prefixes.py); N_seg = its examples, L+1 hidden-state layers):
    hidden  (L+1, T_seg, d)  every real token, ragged examples concatenated on the token axis; no padding
    mean    (N_seg, L+1, d)  float32 mean over each example's tokens (fp32 sum of the stored values)
    last    (N_seg, L+1, d)  the last token's state (same dtype as hidden)
    logits  (N_seg, V)       optional next-token logits at the last prompt position
    token_ids (T_seg,)       optional int32 token ids, aligned with hidden's token axis (--store-token-ids)
    hidden_scale             fp8/intK tiers only: the scales that decode ``hidden``'s 8-bit codes (store/tiers.py)

Every array names its dimensions (zarr v3 ``dimension_names``: xarray and other tools need them) and the group's
attributes say what the values mean (``SEGMENT_FORMAT``), so a segment can be read without probecache.

``hidden`` is chunked (1, 256, d) inside zarr shards of (L+1, 1024, d). The writer buffers tokens and writes
whole zarr shards only (a partial-shard write is a read-modify-write: 7x slower, unsafe with two writers),
encoding each shard itself (see shard_encoding.py) and writing its file at the key the zarr v3 spec's
"default" chunk key encoding gives (declared explicitly on the array, so the key never depends on zarr's
defaults). A plain file write, not zarr's store API: the store's synchronous ``set`` is private in zarr 3
(``zarr.core.sync``), and the file write measured as fast or faster (bench/segment_write.py).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .codecs import activation_blosc, activation_codec, storage_dtype
from .faults import crash_point
from .integrity import crc32c_hex, segment_files
from .layout import FORMAT_VERSION
from .shard_encoding import encode_shard
from .tiers import BLOCK_TOKENS, SCALE_ARRAY, Tier, parse_tier, quantize

TOKENS_PER_ZARR_SHARD = 1024
TOKENS_PER_CHUNK = 256
TOKEN_IDS_PER_CHUNK = 1 << 16  # 256 KiB of int32 per chunk: a 512-example shard of 512 tokens is 4 chunks

# zarr v3 dimension names of each array (attribute-free tools such as xarray label axes with these)
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "hidden": ("layer", "token", "channel"),
    "mean": ("example", "layer", "channel"),
    "last": ("example", "layer", "channel"),
    "logits": ("example", "vocab"),
    "token_ids": ("token",),
}
SCALE_DIMENSIONS = {"fp8": ("layer", "token_block", "channel"), "int": ("layer", "token")}
# The same key encoding zarr uses by default for v3, declared so that the shard keys the writer computes
# (chunk_key) are the spec's, whatever a future zarr's default is
CHUNK_KEY_ENCODING = {"name": "default", "separator": "/"}

# What the group attributes say about the values (verified against transformers' Llama with
# output_hidden_states: hidden_states[L] is the final norm applied to block L's output, not the raw block output)
LAYER_MEANING = ("layer 0 = embedding output, layer i = output of block i for 1 <= i < L, "
                 "layer L = output of block L after the final norm (transformers' output_hidden_states)")
DECODING = {
    "bfloat16": "uint16 holding bfloat16 bits: float32 = (uint16.astype(uint32) << 16).view(float32), or "
                ".view(ml_dtypes.bfloat16)",
    "float16": "stored as float16",
    "float32": "stored as float32",
}


SHARED_PREFIXES = ("an example with prefix_tokens = s > 0 in the manifest stores only its tokens s..n_tokens-1, at "
                   "token_offset; its first s states are hidden[:, prefix_offset : prefix_offset + s] (inside an "
                   "earlier example of this segment); token_ids are aligned with hidden's token axis the same way")


def chunk_key(array: str, coords: Sequence[int]) -> str:
    """The file of one chunk (or zarr shard) of an array in the group: "default" encoding, "/" separator."""
    return f"{array}/c/" + "/".join(str(c) for c in coords)


@dataclass(frozen=True)
class SegmentShape:
    n_layers: int  # stored layers: L+1, or fewer with --layers (layer_indices says which)
    hidden_size: int  # d
    n_tokens: int  # T_seg
    n_examples: int  # N_seg
    logical_dtype: str  # "bfloat16" | "float16" | "float32"
    vocab_size: int | None = None  # set when logits are captured
    token_ids: bool = False  # also store each kept token's id (--store-token-ids)
    tier: str = "lossless"  # how hidden's values are stored (store/tiers.py); mantissa rounding is the caller's
    layer_indices: tuple[int, ...] | None = None  # the model layer of each stored layer (--layers); None = all L+1
    tokens: str = "all"  # which tokens of each prompt are kept (store/token_policy.py); the caller picks them
    # --share-prefixes (store/prefixes.py): examples may store only their tokens after a shared prefix, so
    # n_tokens is the examples' tokens, an upper bound of hidden's token axis, which close() cuts to what was written
    share_prefixes: bool = False

    @property
    def itemsize(self) -> int:
        """Bytes per value at the model's dtype: raw sizes are counted there, so a tier's gain shows in the ratio."""
        return np.dtype(storage_dtype(self.logical_dtype)).itemsize

    @property
    def value_tier(self) -> Tier:
        return parse_tier(self.tier)

    @property
    def hidden_dtype(self) -> type[np.generic]:
        """What ``hidden`` holds on disk: 8-bit codes for fp8/int8 tiers, else the logical dtype's storage."""
        return self.value_tier.storage or storage_dtype(self.logical_dtype)

    @property
    def hidden_bytes_per_token(self) -> int:
        return self.n_layers * self.hidden_size * self.itemsize

    @property
    def raw_bytes(self) -> int:
        """Uncompressed size of every array in the segment (mean is float32, token ids int32, the others as hidden)."""
        per_example = self.n_layers * self.hidden_size * (4 + self.itemsize) + (self.vocab_size or 0) * self.itemsize
        per_token = self.hidden_bytes_per_token + (4 if self.token_ids else 0)
        return self.n_tokens * per_token + self.n_examples * per_example


def segment_attributes(shape: SegmentShape, store_id: str | None = None, shard_id: int | None = None) -> dict:
    """The segment group's attributes: enough to interpret its arrays without probecache or store.json."""
    attrs = {
        "probecache_format_version": FORMAT_VERSION,
        "store_id": store_id,
        "shard_id": shard_id,
        "n_layers": shape.n_layers,
        # absent when every layer is kept (position i is then model layer i)
        "layer_indices": list(shape.layer_indices) if shape.layer_indices is not None else None,
        "tokens": shape.tokens if shape.tokens != "all" else None,  # the kept tokens: store/token_policy.py
        "n_tokens": shape.n_tokens,
        "n_examples": shape.n_examples,
        "layers": LAYER_MEANING,
        "logical_dtype": shape.logical_dtype,
        "decoding": shape.value_tier.decoding or DECODING[shape.logical_dtype],
        "tier": shape.tier if shape.tier != "lossless" else None,  # absent on lossless segments, as before tiers
        "rows": "examples are concatenated on hidden's token axis; the store's manifests/part-NNNNN.parquet gives "
                "each example's token_offset, n_tokens and row (its index in mean, last, logits)",
        "shared_prefixes": SHARED_PREFIXES if shape.share_prefixes else None,
    }
    return {k: v for k, v in attrs.items() if v is not None}


class SegmentWriter:
    """Append examples in order; ``close()`` flushes the tail and the per-example arrays."""

    def __init__(self, path: Path, shape: SegmentShape, pool: Executor | None = None, *,
                 store_id: str | None = None, shard_id: int | None = None):
        self.path = Path(path)
        self._pool = pool  # optional threads for blosc (GPU hosts have idle cores; 2-core CPUs do not)
        self.shape = shape
        s = shape
        dtype = storage_dtype(s.logical_dtype)
        self._tier = s.value_tier
        hidden_dtype = s.hidden_dtype
        # zarr_format explicit: a user's zarr config may default to v2, which has no dimension_names or sharding
        group = zarr.open_group(str(self.path), mode="w-", zarr_format=3,
                                attributes=segment_attributes(s, store_id, shard_id))
        self._tokens = max(s.n_tokens, 1)  # the token axis' length (zarr arrays cannot be empty here)
        group.create_array(
            "hidden", shape=(s.n_layers, self._tokens, s.hidden_size), dtype=hidden_dtype,
            chunks=(1, TOKENS_PER_CHUNK, s.hidden_size),
            shards=(s.n_layers, TOKENS_PER_ZARR_SHARD, s.hidden_size),
            compressors=activation_codec(), fill_value=0, chunk_key_encoding=CHUNK_KEY_ENCODING,
            dimension_names=DIMENSIONS["hidden"],
            attributes={"logical_dtype": s.logical_dtype, "n_tokens": s.n_tokens,
                        **({"tier": s.tier, "decoding": self._tier.decoding} if self._tier.quantized else {})},
            # zarr otherwise compares every chunk with the fill value before writing it: a full extra pass
            # over the data, and activations are never all zero
            config={"write_empty_chunks": True},
        )
        self._group = group
        crash_point("segment-created")
        self._codec = activation_blosc(np.dtype(hidden_dtype).itemsize)
        # the buffer holds values in the logical dtype; a quantized tier encodes each full block at flush
        if self._tier.kind == "fp8":  # (L+1, n_blocks, d): one row per zarr shard
            self._scale = np.ones((s.n_layers, -(-self._tokens // BLOCK_TOKENS), s.hidden_size), dtype=np.float32)
        elif self._tier.kind == "int":  # (L+1, T_seg): one per token
            self._scale = np.ones((s.n_layers, self._tokens), dtype=np.float32)
        else:
            self._scale = None
        self._buffer = np.empty((s.n_layers, TOKENS_PER_ZARR_SHARD, s.hidden_size), dtype=dtype)
        self._buffered = 0  # tokens in the buffer
        self._flushed = 0  # tokens already written to zarr
        self._mean = np.empty((s.n_examples, s.n_layers, s.hidden_size), dtype=np.float32)
        self._last = np.empty((s.n_examples, s.n_layers, s.hidden_size), dtype=dtype)
        self._logits = None if s.vocab_size is None else np.empty((s.n_examples, s.vocab_size), dtype=dtype)
        self._token_ids = np.zeros(self._tokens, dtype=np.int32) if s.token_ids else None  # (T_seg,)
        self._rows = 0
        self.files: dict[str, tuple[int, str]] = {}  # relative path -> (size, crc32c), filled by close()
        # every file this writer has written so far: what must still be there when it commits (see damage())
        self._written: set[str] = {"zarr.json", "hidden/zarr.json"}

    def stored_bytes(self, array: str = "hidden") -> int:
        """Bytes on disk of one array's files so far, from the writer's own record (no directory walk)."""
        return sum(size for key, (size, _) in self.files.items() if key.startswith(array + "/"))

    @property
    def tokens_flushed(self) -> int:
        return self._flushed

    @property
    def tokens_written(self) -> int:
        return self._flushed + self._buffered

    def append(self, hidden: Sequence[np.ndarray], mean: np.ndarray, logits: np.ndarray | None = None,
               token_ids: Sequence[int] | None = None) -> tuple[int, int]:
        """Add one example: ``hidden[l]`` is layer l's (n, d) states in storage dtype (a 3-D array or a
        list of per-layer arrays), ``mean`` its (L+1, d) float32 means, ``token_ids`` its n kept ids (required
        when the shape stores them). Returns its (row, token_offset)."""
        n = hidden[0].shape[0]
        row, offset = self._rows, self.tokens_written
        if row >= self.shape.n_examples or offset + n > self.shape.n_tokens:
            raise ValueError("segment overflow: more examples or tokens than planned")
        if self._token_ids is not None:
            ids = np.asarray(token_ids, dtype=np.int64)  # (n,); int64 first so an id >= 2^31 is caught, not wrapped
            if ids.shape != (n,) or (n and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max)):
                raise ValueError(f"token ids must be {n} ids in 0..2^31-1 (one per hidden state), got {ids.shape}")
            self._token_ids[offset : offset + n] = ids
        self._mean[row] = mean
        for layer in range(self.shape.n_layers):
            self._last[row, layer] = hidden[layer][n - 1]
        if self._logits is not None:
            self._logits[row] = logits
        done = 0
        while done < n:  # copy into the shard buffer, writing each zarr shard as soon as it is full
            take = min(n - done, TOKENS_PER_ZARR_SHARD - self._buffered)
            for layer in range(self.shape.n_layers):
                self._buffer[layer, self._buffered : self._buffered + take] = hidden[layer][done : done + take]
            self._buffered += take
            done += take
            if self._buffered == TOKENS_PER_ZARR_SHARD:
                self._flush()
        self._rows += 1
        return row, offset

    def _flush(self) -> None:
        """Encode and store the buffered tokens as one whole zarr shard (the last one ends the array)."""
        shard = self._flushed // TOKENS_PER_ZARR_SHARD
        block = self._buffer[:, : self._buffered]  # (L+1, n, d) in the logical dtype's storage
        if self._scale is not None:
            block, scale = quantize(block, self.shape.logical_dtype, self._tier)  # (L+1, n, d) codes
            if self._tier.kind == "fp8":
                self._scale[:, shard] = scale  # (L+1, d)
            else:
                self._scale[:, self._flushed : self._flushed + self._buffered] = scale  # (L+1, n)
        data = encode_shard(block, TOKENS_PER_CHUNK, TOKENS_PER_ZARR_SHARD,
                            self._codec, fill_value=0, pool=self._pool)
        key = chunk_key("hidden", (0, shard, 0))
        path = self.path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:  # "x": each zarr shard file is written once; an existing one is a bug
            f.write(data)
        self.files[key] = (len(data), crc32c_hex(data))
        self._written.add(key)
        crash_point("zarr-shard-written")
        self._flushed, self._buffered = self._flushed + self._buffered, 0

    def close(self) -> int:
        """Write everything still buffered and checksum every file (``self.files``); returns the bytes on disk."""
        s = self.shape
        short = self.tokens_written < s.n_tokens and not s.share_prefixes  # sharing stores fewer tokens than planned
        if self._rows != s.n_examples or short:
            raise ValueError(
                f"segment incomplete: {self._rows}/{s.n_examples} examples, "
                f"{self.tokens_written}/{s.n_tokens} tokens"
            )
        if self._buffered:
            self._flush()
        if self.stored_tokens < self._tokens:
            self._cut_token_axis()
        whole = {"mean": self._mean, "last": self._last}  # arrays written in one go at the end
        if self._logits is not None:
            whole["logits"] = self._logits
        if self._token_ids is not None:
            whole["token_ids"] = self._token_ids
        if self._scale is not None:
            whole[SCALE_ARRAY] = self._scale
        for name, data in whole.items():
            rows = TOKEN_IDS_PER_CHUNK if name == "token_ids" else 64
            chunks = (min(rows, max(len(data), 1)), *data.shape[1:])
            if name == SCALE_ARRAY and self._tier.kind == "int":  # (L+1, T): chunked on tokens, read per range
                chunks = (data.shape[0], min(TOKEN_IDS_PER_CHUNK, data.shape[1]))
            logical = {"mean": "float32", "token_ids": "int32", SCALE_ARRAY: "float32"}.get(name, s.logical_dtype)
            dims = SCALE_DIMENSIONS[self._tier.kind] if name == SCALE_ARRAY else DIMENSIONS[name]
            self._group.create_array(
                name, data=data, chunks=chunks, compressors=activation_codec(), attributes={"logical_dtype": logical},
                chunk_key_encoding=CHUNK_KEY_ENCODING, dimension_names=dims,
                # every chunk is written, all-zero ones too: the set of files is then known in advance, and a
                # chunk missing at commit time is damage, never "zarr skipped it"
                config={"write_empty_chunks": True},
            )
            grid = [range(math.ceil(n / c)) for n, c in zip(data.shape, chunks, strict=True)]
            self._written |= {f"{name}/zarr.json"} | {chunk_key(name, coords) for coords in itertools.product(*grid)}
        self.files = segment_files(self.path, known=self.files)
        return sum(size for size, _ in self.files.values())

    @property
    def stored_tokens(self) -> int:
        """The length of hidden's token axis: the examples' tokens, less the shared prefixes' (store/prefixes.py)."""
        return max(self.tokens_written, 1)

    def _cut_token_axis(self) -> None:
        """--share-prefixes wrote fewer tokens than planned: hidden's zarr.json gets the real length (every zarr
        shard past it was never written, so zarr's resize has nothing to delete), and the per-token arrays written
        at close are cut to it."""
        stored = self.stored_tokens
        hidden = self._group["hidden"]
        hidden.resize((self.shape.n_layers, stored, self.shape.hidden_size))
        hidden.update_attributes({"n_tokens": stored})
        self._group.update_attributes({"n_tokens": stored})
        if self._token_ids is not None:
            self._token_ids = self._token_ids[:stored]  # (T_stored,)
        if self._scale is not None and self._tier.kind == "fp8":
            self._scale = self._scale[:, : -(-stored // BLOCK_TOKENS)]  # (L', n_blocks, d)
        elif self._scale is not None:
            self._scale = self._scale[:, :stored]  # (L', T_stored)

    def commit_stats(self, shard_id: int, segment: str, padded_tokens: int, started: float, bytes_stored: int) -> dict:
        """The stats a commit records for this closed segment (the part's footer and stats/<segment>.json):
        ``files`` is what `verify` checks the segment against; ``started`` a time.time() for ``seconds``."""
        shape = self.shape
        return {
            "shard_id": shard_id, "segment": segment, "n_examples": shape.n_examples,
            "n_tokens": shape.n_tokens, "padded_tokens": padded_tokens,
            "bytes_stored": bytes_stored, "bytes_raw": shape.raw_bytes,
            "hidden_bytes_stored": self.stored_bytes("hidden"),
            "hidden_bytes_raw": shape.n_tokens * shape.hidden_bytes_per_token,
            **({"stored_tokens": self.stored_tokens} if shape.share_prefixes else {}),
            "seconds": round(time.time() - started, 3),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": self.files,
        }

    def damage(self) -> str | None:
        """What is wrong with the segment on disk now, or None: every file this writer wrote must still be there
        with the size it had (after ``close()``, the size recorded in ``files``). Cheap: one stat per file.
        A segment deleted or truncated underneath the writer (a gc, a person, a failing disk) is never
        committed: the caller writes the shard again in a fresh attempt."""
        missing, resized = [], []
        for rel in sorted(self._written | self.files.keys()):
            try:
                st = os.lstat(self.path / rel)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(rel)
                continue
            if rel in self.files and st.st_size != self.files[rel][0]:
                resized.append(rel)
        if not missing and not resized:
            return None
        what = [f"{len(missing)} files missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
                if missing else "", f"{len(resized)} files changed size ({', '.join(resized[:3])})" if resized else ""]
        return f"segments/{self.path.name}: " + "; ".join(w for w in what if w)
