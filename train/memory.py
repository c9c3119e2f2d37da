"""Keep a training process's memory bounded by what it holds, not by how much it has read.

The token stream reads each segment into a few MB-sized blocks (zarr's decoded chunks, the segment's token
range, per-example copies, the padded batch) and frees them again. glibc serves blocks above its mmap threshold
with mmap and returns them to the kernel on free, but it *raises* that threshold each time such a block is freed
(up to 32 MB on 64-bit). After the first segment every MB-sized block then comes from the heap, which fragments
with every read, and the process's peak RSS grows with the number of segments read, i.e. with the store: +30% at
16x the store for a scoring epoch, +56% for MHA/8 (docs/BENCHMARKS.md "Scale"). Pinning the threshold (which
also turns off its adjustment) keeps large blocks on mmap, so freeing them gives the memory back.

``PROBECACHE_MALLOC_TUNING=0`` leaves the allocator alone; so does any non-glibc platform (macOS, musl), where
this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default starting value: blocks of a segment read are far above it
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
_lock = threading.Lock()
_pinned: bool | None = None  # None: not tried yet in this process


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at 128 KiB for this process (once; idempotent). True when it is pinned."""
    global _pinned
    with _lock:
        if _pinned is None:
            _pinned = _pin()
        return _pinned


def _pin() -> bool:
    if os.environ.get("PROBECACHE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # the user set it through glibc's own variable: theirs wins
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt symbol of this meaning)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
