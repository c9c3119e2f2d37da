"""Shared-prefix dedup (``extract --share-prefixes``): store each distinct prompt prefix once per segment.

A causal LM gives the same states for the same token prefix (a chat template's system prompt, a fixed
instruction), so an example whose first ``s`` states equal those of an earlier example of its segment stores only
its own tokens ``s..n-1``; its manifest row says where the other ``s`` are (``prefix_offset``, ``prefix_tokens``)
and readers put the two ranges back together (``Store.hidden``, the token stream, ``store convert``).

Exactness: equal token ids are only the candidate. A position is shared only when its states are bitwise equal
in every kept layer (compared as unsigned integers of the value's width, so +0.0 and -0.0, or two NaN payloads,
never count as equal): what a reader gets back is exactly what a plain store holds, whatever rounding a batch's
padded length gave the kernels. The comparison is on the model's values before any tier rounds them; rounding is
a function of the bits, so equal before means equal after, and the decisions do not depend on the tier, which is
what lets `store convert` keep them (store/convert.py) and still write the store a direct extraction writes.

Only examples stored in full (sharing nothing) are sources, so a prefix always lies inside one contiguous range of
``hidden``; every example keeps at least its last token of its own (``last`` and the token axis stay per example).
Memory: at most ``max_sources`` sources of at most ``max_prefix`` tokens each, L' x d values per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_SHARED_TOKENS = 16  # below this a reference saves too little to be worth a manifest entry and a second read
MAX_SOURCES = 4  # a chat store needs one per distinct template prefix; more cost memory and comparisons
MAX_PREFIX_TOKENS = 1024  # the longest prefix shared (one zarr shard of tokens)
SOURCE_BUDGET_BYTES = 256 << 20  # the sources' states together; a wide model keeps shorter prefixes instead


@dataclass(frozen=True)
class PrefixShare:
    """The first ``tokens`` states of an example are those at ``offset`` on its segment's hidden token axis."""

    offset: int
    tokens: int


@dataclass
class _Source:
    token_ids: np.ndarray  # (m,) int64, the first m ids of a fully stored example
    bits: np.ndarray  # (L', m, d) its first m states as unsigned integers (the values' bits)
    offset: int  # where its first state is on the segment's hidden token axis


def _bits(states: Sequence[np.ndarray], m: int) -> np.ndarray:
    """The first ``m`` positions of L' x (n, d) states as one (L', m, d) unsigned-integer array (a copy)."""
    first = np.asarray(states[0])
    unsigned = np.dtype(f"u{first.dtype.itemsize}")
    return np.stack([np.ascontiguousarray(np.asarray(h)[:m]).view(unsigned) for h in states])


class PrefixMatcher:
    """The sharing decisions of one segment: ``match`` before an example is written, ``add_source`` after a full
    one is. Deterministic: the same examples in the same order give the same decisions."""

    def __init__(self, bytes_per_token: int, min_tokens: int = MIN_SHARED_TOKENS, max_sources: int = MAX_SOURCES,
                 max_prefix: int = MAX_PREFIX_TOKENS, budget_bytes: int = SOURCE_BUDGET_BYTES):
        if min_tokens < 1 or max_sources < 1:
            raise ValueError(f"min_tokens and max_sources must be >= 1, got {min_tokens} and {max_sources}")
        self.min_tokens = min_tokens
        self.max_sources = max_sources
        # bytes_per_token: L' x d x value bytes; the budget caps the prefix length, never the source count
        self.max_prefix = max(min(max_prefix, budget_bytes // (max_sources * max(bytes_per_token, 1))), min_tokens)
        self._sources: list[_Source] = []  # least recently used first
        self.shared_examples = 0
        self.shared_tokens = 0
        self.stopped_by_bits = 0  # shares cut short (or lost) where token ids still matched but a state did not

    def match(self, token_ids: Sequence[int], states: Sequence[np.ndarray]) -> PrefixShare | None:
        """The longest prefix of this example (``token_ids`` (n,), L' x (n, d) states as they would be stored
        unrounded) a source holds bit for bit, or None when under ``min_tokens``. At most n - 1 tokens."""
        ids = np.asarray(token_ids, dtype=np.int64)  # (n,)
        limit = min(len(ids) - 1, self.max_prefix)
        if limit < self.min_tokens:
            return None
        best, best_source, cut = 0, None, False
        for source in reversed(self._sources):  # most recent first: a tie goes to the newest source
            m = min(limit, len(source.token_ids))
            differ = np.flatnonzero(ids[:m] != source.token_ids[:m])
            common = int(differ[0]) if differ.size else m  # candidate positions: same token ids
            if common < max(self.min_tokens, best + 1):
                continue
            mine = _bits(states, common)  # (L', c, d)
            same = (mine == source.bits[:, :common]).all(axis=(0, 2))  # (c,) every layer, every channel
            shared = common if same.all() else int(np.argmin(same))
            cut = cut or shared < common
            if shared > best:
                best, best_source = shared, source
        self.stopped_by_bits += cut
        if best_source is None or best < self.min_tokens:
            return None
        self._sources.remove(best_source)  # now the most recently used
        self._sources.append(best_source)
        self.shared_examples += 1
        self.shared_tokens += best
        return PrefixShare(best_source.offset, best)

    def add_source(self, token_ids: Sequence[int], states: Sequence[np.ndarray], offset: int) -> None:
        """Remember an example stored in full at ``offset`` (its unrounded states, as ``match`` was given)."""
        m = min(len(token_ids), self.max_prefix)
        if m < self.min_tokens:
            return  # too short to give anyone a share
        self._sources.append(_Source(np.asarray(token_ids[:m], dtype=np.int64), _bits(states, m), offset))
        if len(self._sources) > self.max_sources:
            self._sources.pop(0)  # the least recently used


def own_part(share: PrefixShare | None, states: Sequence[np.ndarray], token_ids: Sequence[int] | None
             ) -> tuple[list[np.ndarray], Sequence[int] | None]:
    """What an example stores itself: its states (and ids) after the shared prefix."""
    skip = 0 if share is None else share.tokens
    return [h[skip:] for h in states], None if token_ids is None else token_ids[skip:]


def example_ranges(token_offset: int, n_tokens: int, prefix_offset: int = 0, prefix_tokens: int = 0
                   ) -> list[tuple[int, int]]:
    """An example's [start, stop) ranges on its segment's hidden token axis, in token order: its ``n_tokens``
    states are these ranges concatenated (the shared prefix's, then its own)."""
    own = (token_offset, token_offset + n_tokens - prefix_tokens)
    return [(prefix_offset, prefix_offset + prefix_tokens), own] if prefix_tokens else [own]


__all__ = ["MIN_SHARED_TOKENS", "PrefixMatcher", "PrefixShare", "example_ranges", "own_part"]
