"""The token arena (train/arena.py): examples copied into pages come back exactly, pages are reused, the
memory an arena takes follows the pages held at once, not the tokens that went through it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from probecache.train.arena import MAX_PAGE_TOKENS, MIN_PAGE_TOKENS, TokenArena, page_tokens_for


def random_example(rng, layers: int, width: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """An example (L', n, d) and parts whose concatenation it is (a shared prefix and its own tokens, as strided
    views of a larger segment block, the way the stream hands them over)."""
    block = rng.integers(0, 1 << 16, size=(layers, n + 7, width), dtype=np.uint16)
    cut = int(rng.integers(0, n + 1))
    parts = [block[:, 2 : 2 + cut], block[:, 7 + cut : 7 + n]]
    return np.concatenate(parts, axis=1), [p for p in parts if p.shape[1]] or [parts[0]]


@pytest.mark.parametrize("page_tokens", [1, 4, 16])
def test_examples_come_back_exactly_in_any_release_order(page_tokens):
    rng = np.random.default_rng(0)
    arena = TokenArena(3, 5, np.uint16, page_tokens)
    held: list[tuple[np.ndarray, list[int]]] = []
    for _ in range(400):
        example, parts = random_example(rng, 3, 5, int(rng.integers(0, 40)))
        held.append((example, arena.put(parts)))
        while held and rng.random() < 0.5:  # shuffle-buffer draws: any held example, not the oldest
            example, pages = held.pop(int(rng.integers(len(held))))
            n = example.shape[1]
            out = np.full((3, n + 3, 5), 7, dtype=np.uint16)
            arena.gather(pages, n, out)
            assert np.array_equal(out[:, :n], example) and (out[:, n:] == 7).all()  # past n: untouched
            arena.release(pages)
    in_use = {page for _, pages in held for page in pages}
    assert sum(len(pages) for _, pages in held) == len(in_use)  # no page is given to two examples


def test_pages_are_reused_so_memory_follows_what_is_held_not_what_went_through():
    arena = TokenArena(2, 8, np.float32, 4)
    arena.block_pages = 16  # small blocks, so growth would show
    part = np.ones((2, 10, 8), dtype=np.float32)  # 3 pages each
    for _ in range(1000):
        pages = [arena.put([part]) for _ in range(5)]
        for p in pages:
            arena.release(p)
    assert arena.peak_pages == 15 and arena.capacity_pages == 16  # one block for 10,000 examples


def test_claiming_and_releasing_from_two_threads_never_shares_a_page():
    arena = TokenArena(1, 2, np.uint16, 2)
    arena.block_pages = 8
    taken: list[list[int]] = []
    lock = threading.Lock()

    def work():
        for _ in range(2000):
            pages = arena.put([np.zeros((1, 5, 2), dtype=np.uint16)])
            with lock:
                taken.append(pages)
            arena.release(pages)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(arena._free) == arena.capacity_pages <= 2 * 3 + arena.block_pages  # every page back, none twice
    assert len(set(arena._free)) == len(arena._free)


def test_page_size_follows_the_examples():
    assert page_tokens_for([]) == MIN_PAGE_TOKENS
    assert page_tokens_for([3, 5, 8]) == MIN_PAGE_TOKENS  # short examples: small pages, little waste
    assert page_tokens_for([100] * 9) == 16  # a quarter of the median, a power of two
    assert page_tokens_for([5000]) == MAX_PAGE_TOKENS
