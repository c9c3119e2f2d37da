"""A guard on the free heap a training process keeps: peak RSS follows what it holds, not what it has read.

The token stream's own memory does not fragment the heap: held examples live in the epoch's arena
(train/arena.py), shard files in mappings of their own (store/verified.py: read_off_heap), decoded-cache
entries in a reused buffer. What is left on the heap is glibc's choice: above its dynamic mmap threshold (raised
up to 32 MB by the first large block freed) the batches and the probe's per-layer tensors, MB-sized and of a
different size for every batch (B x T_max), come from the heap too. Usually glibc reuses them and RSS is flat;
in some runs the varied sizes fragment it and it keeps GBs free (an eval of 5,504 reviews: 2.4 GB RSS with
145 MB in use, the same command 1.0 GB the run before; docs/BENCHMARKS.md "Scale").

:func:`guard_heap` is called by the stream after each segment. When the resident set has grown by more than
``PROBECACHE_HEAP_SLACK_MB`` (default 256) since the last trim, it returns glibc's free heap to the kernel
(``malloc_trim``) and takes the new RSS as the mark. Growth that is memory in use (a larger batch, a cache
filling up) only moves the mark, so a run that does not fragment never trims and keeps glibc's speed.

The alternative, pinning glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``, what probecache did
before), is flat in every run but sends every block over 128 KiB to a fresh mmap, the probe's tensors
included, each page-faulted in anew: up to 2x an epoch's time. It is glibc's own variable, so a user can still
choose it. ``PROBECACHE_HEAP_SLACK_MB=0`` turns the guard off; on non-glibc platforms it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading

from .errors import TrainError

DEFAULT_SLACK_MB = 256
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_lock = threading.Lock()
_mark = 0  # resident bytes after the last trim (0: not measured yet)
trims = 0  # how many times this process trimmed (bench/scaling_rss.py reports it per epoch)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.restype, trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
    return trim


def slack_bytes() -> int:
    value = os.environ.get("PROBECACHE_HEAP_SLACK_MB", str(DEFAULT_SLACK_MB))
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if mb < 0:
        raise TrainError(f"PROBECACHE_HEAP_SLACK_MB must be a number of MB >= 0 (0 turns the heap guard off), "
                         f"not {value!r}")
    return int(mb * (1 << 20))


def resident_bytes() -> int:
    """This process's resident set now (/proc/self/statm: one small read)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def guard_heap(slack: int | None = None) -> bool:
    """Return the free heap to the kernel if RSS grew by more than ``slack`` bytes (default :func:`slack_bytes`)
    since the last time; True if it did."""
    global _mark, trims
    slack = slack_bytes() if slack is None else slack
    if slack == 0:
        return False
    with _lock:
        trim = _malloc_trim()
        if trim is None:
            return False
        now = resident_bytes()
        if _mark == 0 or now < _mark:
            _mark = now
        if now - _mark <= slack:
            return False
        trim(0)
        trims += 1
        _mark = resident_bytes()
        return True
