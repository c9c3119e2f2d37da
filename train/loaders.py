"""Data loaders of the train stage (design.md §7): a pooled tier in memory and a token-level stream.

- **Pooled tier** (:func:`load_pooled`): the per-example ``mean`` / ``last`` arrays of a split, read once
  (whole arrays per segment, one contiguous layer slice per run of consecutive layers) into one
  (N, L', d) float32 tensor. Pooling and per-layer linear probes and layer sweeps train on it in seconds.
- **Token stream** (:class:`TokenStream`): every token of every example of a split, for scoring / MHA probes.
  Per epoch the segments (shards) holding the split are permuted by a generator seeded with (seed, epoch);
  each segment's ``hidden`` is read whole (the token range spanning the split's examples) with one contiguous
  layer slice per run of consecutive layers, its examples copied into the pages of the epoch's token arena
  (train/arena.py: memory reused page for page, so the heap never fragments under the buffer's random frees)
  and pushed into a shuffle buffer bounded by ``buffer_tokens`` real tokens, from which examples are drawn
  in a seeded random order and padded into batches to the batch's own longest example. The segment reads of
  an epoch run ahead on a background thread (``prefetch`` segments, train/prefetch.py) while the consumer
  keeps the serial order, so the batches are identical with or without it. A store with a ``decoded_cache``
  (store/decoded_cache.py, ``train --decoded-cache``) serves those reads from uncompressed, checked local
  copies after the first.

Only the manifest is filtered by split; segments without examples of the split are never opened. zarr
integer-list selection (~40x slower than a slice) is never used. This module imports neither
``transformers`` nor the extract stage.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from probecache.manifests.schema import PREFIX_COLUMNS
from probecache.store.codecs import LOGICAL_DTYPES, from_storage, storage_dtype
from probecache.store.decoded_cache import ReadBuffer
from probecache.store.layers import Layers
from probecache.store.prefixes import example_ranges
from probecache.store.reader import Store, open_store

from .arena import TokenArena, page_tokens_for
from .errors import TrainError
from .memory import guard_heap, slack_bytes
from .prefetch import read_ahead

_MANIFEST_COLUMNS = ["example_id", "label", "n_tokens", "segment", "token_offset", "row"]


# ---- shared helpers ---------------------------------------------------------------------------------------


def _as_store(store: Store | str | Path) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def _labels(column) -> torch.Tensor:
    """The manifest's ``label`` column as int64; a missing label (multi-label-only sources) becomes -1."""
    return torch.tensor([-1 if v is None else int(v) for v in column.to_pylist()], dtype=torch.long)


def _split_manifest(store: Store, split: str | Sequence[str] | None, ids: Collection[str] | None = None,
                    extra_columns: Sequence[str] = ()):
    """The manifest rows of a split (optionally only the examples in ``ids``: a carved subset), storage order."""
    expr = None if ids is None else pc.field("example_id").isin(pa.array(sorted(ids), type=pa.string()))
    table = store.manifest(split=split, columns=[*_MANIFEST_COLUMNS, *extra_columns], filter=expr)
    if table.num_rows == 0:
        subset = "" if ids is None else f" among the {len(ids)} example ids given"
        raise TrainError(f"store {store.store_id} has no committed examples of split {split!r}{subset}")
    return table


# ---- tier 0: pooled arrays --------------------------------------------------------------------------------


@dataclass
class PooledData:
    x: torch.Tensor  # (N, L', d) float32
    y: torch.Tensor  # (N,) int64
    example_ids: list[str]
    layers: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.example_ids)


# decoded pooled tiers, per open store: a sweep's groups (one per batch size), its test read and a second sweep
# on the same Store object load a split once. Entries are shared: callers index them, never write into them.
_POOLED_MEMO: weakref.WeakKeyDictionary[Store, OrderedDict[tuple, PooledData]] = weakref.WeakKeyDictionary()
# per store, in bytes of x (N x L' x d x 4): a tier larger than this is read again when asked again, so holding
# splits past their use never costs more than this
_POOLED_MEMO_BYTES = 1 << 30
_POOLED_MEMO_LOCK = threading.Lock()


def load_pooled(store: Store | str | Path, split: str | Sequence[str] | None, kind: str = "mean",
                layers: Layers = None, ids: Collection[str] | None = None) -> PooledData:
    """Per-example pooled states of a split in manifest order: x (N, L', d) float32, y (N,) from ``label``.

    Each segment's ``kind`` array is read whole (one read per run of consecutive layers), then the split's
    rows are picked in memory: no per-example reads. ``ids`` keeps only those examples of the split. The result
    is kept for the open store (the splits loaded last, up to 1 GiB) and returned again for the same arguments:
    treat its tensors as read-only.
    """
    if kind not in ("mean", "last"):
        raise ValueError(f"kind must be 'mean' or 'last', not {kind!r}")
    store = _as_store(store)
    layer_list = store.select_layers(layers)
    key = (split if isinstance(split, str | None) else tuple(split), kind, tuple(layer_list),
           None if ids is None else tuple(sorted(ids)))
    with _POOLED_MEMO_LOCK:
        memo = _POOLED_MEMO.setdefault(store, OrderedDict())
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
    data = _read_pooled(store, split, kind, layer_list, ids)
    with _POOLED_MEMO_LOCK:
        memo[key] = data
        while sum(d.x.nbytes for d in memo.values()) > _POOLED_MEMO_BYTES:
            memo.popitem(last=False)
    return data


def _read_pooled(store: Store, split, kind: str, layer_list: list[int], ids) -> PooledData:
    table = _split_manifest(store, split, ids)
    segments = table["segment"].to_pylist()
    rows = np.asarray(table["row"].to_pylist(), dtype=np.int64)
    x = torch.empty((table.num_rows, len(layer_list), store.hidden_size), dtype=torch.float32)
    for segment in dict.fromkeys(segments):
        positions = np.flatnonzero(np.asarray(segments, dtype=object) == segment)
        block = store.read_pooled(segment, kind, layer_list)  # (rows, L', d)
        x[torch.from_numpy(positions)] = block[torch.from_numpy(rows[positions])].to(torch.float32)
    return PooledData(x=x, y=_labels(table["label"]), example_ids=table["example_id"].to_pylist(),
                      layers=layer_list, label_names=list(store.label_names))


# ---- tier 1: token stream ---------------------------------------------------------------------------------


@dataclass
class Batch:
    hidden: torch.Tensor  # (B, L', T_max, d), zero padding at the end of the token axis
    mask: torch.Tensor  # (B, T_max) bool, True on real tokens
    y: torch.Tensor  # (B,) int64
    example_ids: list[str]

    def __len__(self) -> int:
        return len(self.example_ids)


@dataclass
class _Example:
    example_id: str
    label: int
    n_tokens: int
    # [start, stop) ranges on the segment's token axis whose concatenation is the example: one, or a shared prefix
    # then its own tokens (--share-prefixes, store/prefixes.py: example_ranges)
    ranges: list[tuple[int, int]]


class TokenStream:
    """Token-level batches of one split, shuffled with bounded memory; iterate ``stream.epoch(e)``.

    Order: the segments holding the split are permuted by a generator seeded with (seed, epoch); each is read
    whole and its examples enter a shuffle buffer; whenever the buffer holds more than ``buffer_tokens``
    real tokens, examples are drawn from it uniformly at random (same generator) until it is back under the
    bound; at the end it is drained in random order. The sample order is therefore a pure function of
    (seed, epoch, manifest): identical across runs and machines. ``shuffle=False`` gives manifest order.
    Every example of the split appears exactly once per epoch; ``len(stream)`` is the number of examples.

    Memory bound: examples are held in the pages of one arena per epoch (train/arena.py: pages of
    ``page_tokens`` tokens x L' x d stored values, 2 B each for bf16/fp16, 4 B for fp32), from their segment's
    read until their batch is assembled, so what the buffer costs is the most pages in use at once, and freed
    pages are reused, never returned to the allocator piecemeal. On top of the arena: one segment being read
    (L' x T_segment x d values) and ``prefetch`` read ahead, and the batch being assembled (B x L' x T_max x d
    in ``dtype``). ``peak_buffered_tokens`` records the largest token count the buffer reached (after a
    segment's examples were pushed, before any draw). ``peak_held_tokens`` records the largest count of tokens
    the stream held in pages at once (read ahead, in the buffer, or waiting for their batch): at most
    ``buffer_tokens`` + (1 + ``prefetch``) x the largest segment's tokens of the split + ``batch_size`` x the
    longest example, whatever the store's size; ``peak_arena_bytes`` the most bytes of pages in use at once
    (tests/train/test_memory_bound.py; bench/scaling.py --rss measures the RSS).

    Prefetch: with ``prefetch`` >= 1 (default 1) the epoch's segment reads (order known up front from
    ``segment_order``) run up to ``prefetch`` segments ahead on ``prefetch_threads`` background threads
    (default: the host's cores less one, at least 1, at most ``prefetch``); examples enter the buffer in the
    serial order, so the batches are identical to ``prefetch=0`` (reads on the consuming thread). A failed
    read raises its own error where the serial read would; closing or abandoning the epoch's iterator shuts
    the threads down.

    Batches are padded (zeros, at the end) to their own longest example; ``dtype`` is the batch dtype
    (float32 by default; None keeps the stored dtype, e.g. bfloat16). ``ids`` keeps only those examples of
    the split (a validation set carved from train, for instance).
    """

    def __init__(self, store: Store | str | Path, split: str | Sequence[str] | None, layers: Layers = None,
                 batch_size: int = 32, shuffle: bool = True, seed: int = 0, buffer_tokens: int = 65536,
                 dtype: torch.dtype | None = torch.float32, drop_last: bool = False,
                 ids: Collection[str] | None = None, prefetch: int = 1, prefetch_threads: int | None = None):
        if batch_size < 1:
            raise TrainError(f"--batch-size must be a positive integer, got {batch_size}")
        if buffer_tokens < 0:
            raise TrainError(f"--buffer-tokens must be >= 0, got {buffer_tokens}")
        if prefetch < 0 or (prefetch_threads is not None and prefetch_threads < 1):
            raise TrainError(f"prefetch must be >= 0 segments and prefetch_threads >= 1, got {prefetch} and "
                             f"{prefetch_threads}")
        self.store = _as_store(store)
        self.split = split
        self.layers = self.store.select_layers(layers)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_tokens = buffer_tokens
        self.logical_dtype = self.store.logical_dtype
        self.dtype = LOGICAL_DTYPES[self.logical_dtype][0] if dtype is None else dtype
        self.drop_last = drop_last
        self.prefetch, self.prefetch_threads = prefetch, prefetch_threads
        self.label_names: list[str] = list(self.store.label_names)
        self.peak_buffered_tokens = 0
        self.peak_held_tokens = 0
        self.peak_arena_bytes = 0
        self._held = 0  # tokens held in arena pages now (read, buffered or pending); reader threads add
        self._held_lock = threading.Lock()
        self._thread = threading.local()  # per reader thread: the buffer decoded-cache entries are read into
        self._heap_slack = slack_bytes()  # read (and a bad PROBECACHE_HEAP_SLACK_MB refused) before any work
        self._next_epoch = 0

        prefix = list(PREFIX_COLUMNS) if self.store.shares_prefixes else []  # --share-prefixes stores only
        table = _split_manifest(self.store, split, ids, prefix)
        cols = [table[c].to_pylist() for c in ("example_id", "label", "segment", "token_offset", "n_tokens",
                                                 *prefix)]
        self.example_ids: list[str] = cols[0]
        self._segments: dict[str, list[_Example]] = {}  # manifest order, grouped by segment
        for eid, label, segment, offset, n, *shared in zip(*cols, strict=True):
            ranges = example_ranges(int(offset), int(n), *(int(v or 0) for v in shared))
            self._segments.setdefault(segment, []).append(_Example(eid, -1 if label is None else int(label),
                                                                    int(n), ranges))
        self.n_tokens = sum(int(n) for n in cols[4])
        self.page_tokens = page_tokens_for([int(n) for n in cols[4]])
        segment_tokens = [sum(e.n_tokens for e in examples) for examples in self._segments.values()]
        # the most tokens an epoch holds in pages at once (see Memory bound): sizes the arena's blocks
        self.held_bound_tokens = (buffer_tokens + (1 + prefetch) * max(segment_tokens)
                                  + batch_size * max(int(n) for n in cols[4]))

    def __len__(self) -> int:
        return len(self.example_ids)

    @property
    def n_batches(self) -> int:
        n = len(self)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        """Successive epochs on successive iterations (0, 1, 2, ...); ``epoch(e)`` picks one explicitly."""
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return self.epoch(epoch)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), int(epoch)])

    def segment_order(self, epoch: int) -> list[str]:
        names = list(self._segments)
        if not self.shuffle:
            return names
        return [names[i] for i in self._rng(epoch).permutation(len(names))]

    def _hold(self, tokens: int) -> None:
        """Count tokens put into pages (+) or handed over to a batch (-); two integer ops per segment / batch."""
        with self._held_lock:
            self._held += tokens
            self.peak_held_tokens = max(self.peak_held_tokens, self._held)

    def _read_segment(self, segment: str, arena: TokenArena) -> list[tuple[_Example, list[int]]]:
        """The split's examples of one segment in manifest order, each copied into pages of ``arena`` (their ids).
        Nothing of the segment's read outlives this call: a buffered example never pins its segment."""
        examples = self._segments[segment]
        cache = self.store.decoded_cache  # --decoded-cache: uncompressed, checked local copies when there are some
        if cache is not None:  # each (L', n, d): a view of the example's (n, L', d) values in the cache entry
            if not hasattr(self._thread, "buffer"):  # one per reader thread: they last the epoch's reads
                self._thread.buffer = ReadBuffer()
            values = cache.read_examples(self.store, segment, [e.ranges for e in examples], self.layers,
                                         self._thread.buffer)
            out = [(e, arena.put([v])) for e, v in zip(examples, values, strict=True)]
        else:
            lo = min(start for e in examples for start, _ in e.ranges)  # a shared prefix may lie before the split's
            hi = max(stop for e in examples for _, stop in e.ranges)
            block = self.store.read_tokens(segment, lo, hi, self.layers, decode=False)  # (L', hi - lo, d) stored
            out = [(e, arena.put([block[:, start - lo : stop - lo] for start, stop in e.ranges])) for e in examples]
        self._hold(sum(e.n_tokens for e in examples))
        return out

    def _samples(self, epoch: int, arena: TokenArena) -> Iterator[tuple[_Example, list[int]]]:
        rng = self._rng(epoch)
        names = list(self._segments)
        order = rng.permutation(len(names)) if self.shuffle else range(len(names))
        buffer: list[tuple[_Example, list[int]]] = []
        buffered = 0

        def draw() -> tuple[_Example, list[int]]:  # uniform over the buffer, O(1) swap-remove
            nonlocal buffered
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            item = buffer.pop()
            buffered -= item[0].n_tokens
            return item

        # the reads (maybe ahead, on other threads) never touch rng: draws see the serial sequence of pushes
        segments = read_ahead(lambda segment: self._read_segment(segment, arena), [names[i] for i in order],
                              self.prefetch, self.prefetch_threads)
        try:
            for examples in segments:
                guard_heap(self._heap_slack)  # free heap past the slack goes back to the kernel (memory.py)
                if not self.shuffle:  # manifest order: nothing to mix, no buffer
                    yield from examples
                    continue
                for item in examples:
                    buffer.append(item)
                    buffered += item[0].n_tokens
                del examples  # only the buffer holds them now (the memory bound counts them once)
                self.peak_buffered_tokens = max(self.peak_buffered_tokens, buffered)
                while buffered > self.buffer_tokens:
                    yield draw()
        finally:
            segments.close()  # an epoch left early stops its reader threads now, not at garbage collection
        while buffer:
            yield draw()

    def _collate(self, items: list[tuple[_Example, list[int]]], arena: TokenArena) -> Batch:
        t_max = max(e.n_tokens for e, _ in items)
        # Assembled in numpy on the stored values (all-zero bits are +0.0 in bf16/fp16/fp32 alike), then viewed as
        # the logical dtype: torch's copy into a strided slice of the batch measured ~45x slower than numpy's.
        values = np.zeros((len(items), arena.layers, t_max, arena.width), dtype=arena.dtype)  # (B, L', T, d)
        mask = torch.zeros((len(items), t_max), dtype=torch.bool)
        for b, (e, pages) in enumerate(items):
            arena.gather(pages, e.n_tokens, values[b])
            arena.release(pages)
            mask[b, : e.n_tokens] = True
        hidden = from_storage(values, self.logical_dtype)
        if hidden.dtype != self.dtype:
            hidden = hidden.to(self.dtype)
        y = torch.tensor([e.label for e, _ in items], dtype=torch.long)
        self._hold(-sum(e.n_tokens for e, _ in items))  # their pages are free again: the batch holds the values
        return Batch(hidden=hidden, mask=mask, y=y, example_ids=[e.example_id for e, _ in items])

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch; the same (seed, epoch) always gives the same batches."""
        # the pages of the epoch's held examples; dropped with the epoch, so streams that are not being read
        # (validation during training) hold nothing
        arena = TokenArena(len(self.layers), self.store.hidden_size, storage_dtype(self.logical_dtype),
                           self.page_tokens, self.held_bound_tokens)
        pending: list[tuple[_Example, list[int]]] = []
        samples = self._samples(epoch, arena)
        self._held = 0  # an epoch left early (its arena collected with its generator) must not inflate the next
        try:
            for item in samples:
                pending.append(item)
                if len(pending) == self.batch_size:
                    batch, pending = self._collate(pending, arena), []  # pages freed before the consumer gets it
                    yield batch
        finally:
            samples.close()  # closing this iterator closes the reader's threads too
            self.peak_arena_bytes = max(self.peak_arena_bytes, arena.peak_pages * arena.page_bytes)
        if pending and not self.drop_last:
            batch, pending = self._collate(pending, arena), []
            yield batch
