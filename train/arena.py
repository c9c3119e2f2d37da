"""Fixed-size token pages for the examples a token stream holds between its read and their batch (design.md §7).

A shuffle buffer holds examples of many lengths and frees them in random order. Given one allocation per
example, that is the pattern that fragments a malloc heap: glibc keeps the holes, and a process's peak RSS
grows with the number of segments read, i.e. with the store (+21% at 16x the store for one scoring epoch,
docs/BENCHMARKS.md "Scale"). Here the examples live in pages of ``page_tokens`` tokens instead, carved from a
few large blocks that last one epoch: an example takes ceil(n / page_tokens) pages, any free ones, and gives
them back when its batch is assembled. The blocks never fragment and their memory is reused page for page, so
what the buffer costs is its peak page count, whatever the store's size, and the allocator sees only the
segment reads and the batches, which come and go in order.

A page is (L', page_tokens, d) stored values, the layout of a batch row, so both copies (segment -> pages,
pages -> batch) move contiguous runs of ``page_tokens x d`` values per layer. The free list is last-in
first-out: a freed page is the next one used, so the pages ever touched are about the peak held, not the
capacity. Pages are claimed on a reader thread and freed on the consumer's: one lock guards the free list.
"""

from __future__ import annotations

import threading

import numpy as np

BLOCK_BYTES = 16 << 20  # a block of pages is allocated at a time: a few per epoch, not one per example
MIN_PAGE_TOKENS, MAX_PAGE_TOKENS = 4, 64


def page_tokens_for(lengths: list[int]) -> int:
    """Tokens per page for examples of these lengths: about a quarter of the median, a power of two in [4, 64].
    An example wastes less than a page (a quarter of a median example) and is copied in about four pieces."""
    if not lengths:
        return MIN_PAGE_TOKENS
    quarter = max(1, int(np.median(lengths)) // 4)
    return int(min(MAX_PAGE_TOKENS, max(MIN_PAGE_TOKENS, 1 << (quarter.bit_length() - 1))))


class TokenArena:
    """Pages of (L', page_tokens, d) values of one dtype; grows a block at a time, never shrinks (drop it to free).
    ``expected_tokens``, the most tokens the owner expects to hold at once, sizes the blocks: about half of it
    each, at most ``BLOCK_BYTES``."""

    def __init__(self, layers: int, width: int, dtype: np.dtype, page_tokens: int, expected_tokens: int = 0):
        self.layers, self.width, self.dtype, self.page_tokens = layers, width, np.dtype(dtype), page_tokens
        self.page_bytes = layers * page_tokens * width * self.dtype.itemsize
        half = -(-expected_tokens // (2 * page_tokens)) if expected_tokens > 0 else BLOCK_BYTES
        self.block_pages = max(1, min(half, BLOCK_BYTES // self.page_bytes))
        self._blocks: list[np.ndarray] = []  # each (block_pages, L', page_tokens, d)
        self._free: list[int] = []  # page ids, block * block_pages + index; the end is used first
        self._lock = threading.Lock()
        self.peak_pages = 0  # the most pages in use at once

    @property
    def capacity_pages(self) -> int:
        return len(self._blocks) * self.block_pages

    def _page(self, page: int) -> np.ndarray:
        block, index = divmod(page, self.block_pages)
        return self._blocks[block][index]  # (L', page_tokens, d)

    def _claim(self, count: int) -> list[int]:
        with self._lock:
            while len(self._free) < count:  # a new block; its pages are untouched (not resident) until written
                first = self.capacity_pages
                self._blocks.append(np.empty((self.block_pages, self.layers, self.page_tokens, self.width),
                                             dtype=self.dtype))
                self._free[:0] = range(first + self.block_pages - 1, first - 1, -1)  # used after the freed ones
            pages = self._free[-count:] if count else []
            del self._free[len(self._free) - count:]
            self.peak_pages = max(self.peak_pages, self.capacity_pages - len(self._free))
            return pages

    def release(self, pages: list[int]) -> None:
        with self._lock:
            self._free.extend(reversed(pages))

    def put(self, parts: list[np.ndarray]) -> list[int]:
        """Copy one example into fresh pages and return their ids; ``parts``, each (L', k, d), concatenate to the
        example along the token axis (one part, or a shared prefix and the example's own tokens)."""
        pages = self._claim(-(-sum(p.shape[1] for p in parts) // self.page_tokens))
        slot, filled = 0, 0  # the page being filled, and its tokens so far
        for part in parts:
            done, k = 0, part.shape[1]
            while done < k:
                take = min(k - done, self.page_tokens - filled)
                self._page(pages[slot])[:, filled : filled + take] = part[:, done : done + take]
                done, filled = done + take, filled + take
                if filled == self.page_tokens:
                    slot, filled = slot + 1, 0
        return pages

    def gather(self, pages: list[int], n: int, out: np.ndarray) -> None:
        """Copy an example of ``n`` tokens held in ``pages`` into ``out`` (L', >= n, d), token 0 first."""
        for i, page in enumerate(pages):
            start = i * self.page_tokens
            take = min(self.page_tokens, n - start)
            out[:, start : start + take] = self._page(page)[:, :take]
