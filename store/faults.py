"""Named crash points for fault-injection tests: ``PROBECACHE_CRASH_AT=name[:n]`` SIGKILLs the process the
n-th time (default 1st) execution reaches ``crash_point(name)``. Unset (always, outside tests), a crash
point costs one dict lookup.

The points mark the moments where a real kill -9 (OOM killer, preemption, node failure) is most likely to
leave something half-done; tests/faults kills at each one, reruns, and checks the store is whole.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_ENV = "PROBECACHE_CRASH_AT"
_reached: Counter = Counter()


def crash_point(name: str) -> None:
    wanted = os.environ.get(_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
