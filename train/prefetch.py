"""Read ahead in order: run a known sequence of reads on a small background thread pool (design.md §7).

The token stream knows an epoch's segment order up front, so the next segments can be read and decoded while
the trainer works on the current one. zarr's zstd/blosc decoding and numpy's copies release the GIL, so a
background thread overlaps them with the consumer's batch assembly and the probe's forward/backward.

Results come back strictly in the order of the inputs (a consumer cannot tell the prefetched sequence from
the serial one), at most ``ahead`` reads are submitted and not yet consumed (the memory bound), an error of
a read is raised by the consumer at that read's position (the same exception object), and the pool is shut
down, its threads joined, when the sequence ends, fails or its generator is closed or collected.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

THREAD_PREFIX = "probecache-prefetch"


def default_threads(ahead: int) -> int:
    """Reader threads for ``ahead`` segments in flight: one core is left to the consumer (2 cores -> 1)."""
    return max(1, min(ahead, (os.cpu_count() or 1) - 1))


def read_ahead(read: Callable[[T], R], items: Iterable[T], ahead: int, threads: int | None = None) -> Iterator[R]:
    """``read(item)`` for every item, in order; with ``ahead`` >= 1 up to ``ahead`` reads run ahead on
    ``threads`` background threads (default :func:`default_threads`); ``ahead=0`` reads serially here."""
    if ahead < 0:
        raise ValueError(f"prefetch must be >= 0 segments ahead, got {ahead}")
    if ahead == 0:
        for item in items:
            yield read(item)
        return
    pending = iter(items)
    pool = ThreadPoolExecutor(max_workers=threads or default_threads(ahead), thread_name_prefix=THREAD_PREFIX)
    in_flight: deque[Future[R]] = deque()
    try:
        for item in pending:  # fill the window
            in_flight.append(pool.submit(read, item))
            if len(in_flight) == ahead:
                break
        while in_flight:
            result = in_flight.popleft().result()  # re-raises the read's own exception, here, in order
            item = next(pending, _END)
            if item is not _END:
                in_flight.append(pool.submit(read, item))
            yield result
            del result  # a consumed segment must not stay pinned by this frame while the next one is read
    finally:
        # closed early, or a read failed: nothing queued starts, the read in progress finishes, threads join
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
