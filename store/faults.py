"""Named crash points for fault-injection tests: ``PROBECACHE_CRASH_AT=name[:n]`` SIGKILLs the process the
n-th time (default 1st) execution reaches ``crash_point(name)``; ``PROBECACHE_PAUSE_AT=name:seconds`` sleeps
there once instead (so a test can cancel a job mid-shard). Unset (always, outside tests), a point costs two
environment lookups.

The points mark the moments where a real kill -9 (OOM killer, preemption, node failure) is most likely to
leave something half-done; tests/faults kills at each one, reruns, and checks the store is whole.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_ENV = "PROBECACHE_CRASH_AT"
_PAUSE_ENV = "PROBECACHE_PAUSE_AT"
_reached: Counter = Counter()
_paused: set[str] = set()


def crash_point(name: str) -> None:
    pause = os.environ.get(_PAUSE_ENV)
    if pause and pause.partition(":")[0] == name and name not in _paused:
        _paused.add(name)
        time.sleep(float(pause.partition(":")[2] or 1))
    wanted = os.environ.get(_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
