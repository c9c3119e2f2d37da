"""Leases: how an attempt that is still writing its segment tells `gc` to keep away, on a local disk and on
object storage alike.

While an attempt writes ``segments/<name>/`` (extract) or copies it to another root (extract --root URL,
`store push`, `store pull`), it holds ``leases/<name>.json``:

    {"segment": "<name>", "heartbeat": <unix time>, "holder": {"host", "pid", "boot_id", "pid_ns", "start"}}

written before the first byte of the segment, rewritten every ``HEARTBEAT_SECONDS`` by one background thread,
and removed once the attempt has committed or given up. `gc` never deletes a segment whose lease is fresh,
whatever ``--older-than`` says. A lease is fresh when

    its holder is a running process on this machine (same boot id and pid namespace, same pid and process
    start time: a reused pid is not the holder), or
    it cannot be checked that way (another machine, another container) and
    now - max(heartbeat, the lease's own mtime) < LEASE_TTL_SECONDS.

A holder that is provably gone (killed on this machine) makes its lease stale at once, so `gc --older-than 0`
right after a crash cleans up; elsewhere a lease expires ``LEASE_TTL_SECONDS`` after its last heartbeat.

Why not a lock: object stores have none, and a lock held by a dead process needs the same expiry anyway.
Why expiry cannot lose data: an attempt suspended longer than the TTL on another machine (SIGSTOP, a suspended
SLURM job) may lose its segment to gc, but every attempt checks its segment right before it commits
(extract/shard.py, store/transfer.py) and writes the shard again instead of committing what was deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass

from .errors import StoreError

LEASES = "leases"
LEASE_TTL_SECONDS = 15 * 60.0
HEARTBEAT_SECONDS = 60.0  # many heartbeats per TTL: a slow disk or a busy host never lets a live lease lapse
_MAX_LEASE_BYTES = 1 << 16


def lease_key(segment: str) -> str:
    """The lease of a segment, relative to the store folder (the same key on every kind of root)."""
    return f"{LEASES}/{segment}.json"


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


_BOOT_ID = _read_text("/proc/sys/kernel/random/boot_id")  # one per boot of one machine (Linux)
try:
    _PID_NS: str | None = os.readlink("/proc/self/ns/pid")  # containers on one machine have their own pids
except OSError:
    _PID_NS = None


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if no such live process (zombies are dead)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of proc(5); fields[0] is field 3


def machine_tag() -> str:
    """8 hex digits naming this machine and pid namespace (who can see whose pids), "ffffffff" when unknown."""
    if _BOOT_ID is None or _PID_NS is None:
        return "ffffffff"
    return hashlib.sha256(f"{_BOOT_ID}|{_PID_NS}".encode()).hexdigest()[:8]


def writer_alive(tag: str, pid: int) -> bool | None:
    """Whether the writer a temp file name records (machine tag, pid) is running: None when this process
    cannot tell (another machine or container, or no /proc). A reused pid counts as alive (kept, never lost)."""
    if tag == "ffffffff" or tag != machine_tag():
        return None
    return _start_time(pid) is not None


def holder() -> dict:
    """Who holds the leases this process writes (enough for a gc on the same machine to check it is alive)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _BOOT_ID, "pid_ns": _PID_NS,
            "start": _start_time(os.getpid())}


def holder_alive(who: object) -> bool | None:
    """True / False when ``who`` is / is not a running process that this process can see; None when it cannot
    tell (another machine or container, or a system without /proc)."""
    if not isinstance(who, dict) or _BOOT_ID is None or _PID_NS is None:
        return None
    if who.get("boot_id") != _BOOT_ID or who.get("pid_ns") != _PID_NS or not isinstance(who.get("pid"), int):
        return None
    started = _start_time(who["pid"])
    return started is not None and started == who.get("start")


def lease_bytes(segment: str, now: float | None = None) -> bytes:
    return json.dumps({"segment": segment, "heartbeat": round(time.time() if now is None else now, 3),
                       "holder": holder()}).encode()


@dataclass(frozen=True)
class LeaseState:
    fresh: bool
    why: str  # for reports: "held by pid 123 on this machine", "heartbeat 20s ago", "holder pid 123 is gone"


def lease_state(data: bytes | None, mtime: float, now: float) -> LeaseState:
    """Whether a lease protects its segment. ``data`` is its content (None when unreadable: then its mtime
    alone decides), ``mtime`` the file's or object's last modification."""
    heartbeat, who = None, None
    try:
        doc = json.loads(data) if data is not None and len(data) <= _MAX_LEASE_BYTES else None
        if isinstance(doc, dict):
            who = doc.get("holder")
            value = doc.get("heartbeat")
            if isinstance(value, (int, float)) and math.isfinite(value) and value <= now + LEASE_TTL_SECONDS:
                heartbeat = float(value)  # a heartbeat far in the future is ignored: it would pin the segment
    except ValueError:
        pass
    alive = holder_alive(who)
    pid = who.get("pid") if isinstance(who, dict) else None
    if alive is True:
        return LeaseState(True, f"held by running pid {pid} on this machine")
    if alive is False:
        return LeaseState(False, f"holder pid {pid} on this machine is gone")
    idle = now - max(mtime, heartbeat if heartbeat is not None else mtime)
    return LeaseState(idle < LEASE_TTL_SECONDS, f"heartbeat {max(idle, 0.0):.0f}s ago")


def read_lease(root, segment: str, now: float) -> LeaseState | None:
    """The lease of ``segment`` on a Root (store/remote.py: a local folder or a bucket prefix), or None when it
    has none. Its age is the file's or object's own mtime (a local link is judged by the link, never its target's
    mtime); content larger than any lease is not read."""
    info = root.info(lease_key(segment))
    if info is None:
        return None
    data = root.get(lease_key(segment)) if info.size <= _MAX_LEASE_BYTES else None
    return lease_state(data, info.mtime, now)


class LeaseKeeper:
    """Holds the leases of one writer on one root (a ``Root`` of store/remote.py: a local folder or a bucket
    prefix) and refreshes them all from one daemon thread."""

    def __init__(self, root, interval: float = HEARTBEAT_SECONDS):
        self.root = root
        self.interval = interval
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0  # heartbeats that could not be written (the check before commit is the backstop)

    def hold(self, segment: str) -> None:
        """Write the lease (before the segment's first byte); raises when it cannot be written."""
        with self._lock:
            self.root.put(lease_key(segment), lease_bytes(segment))
            self._held.add(segment)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="probecache-lease", daemon=True)
                self._thread.start()

    def refresh(self, segment: str) -> None:
        """A heartbeat now (right before the check that precedes a commit)."""
        with self._lock:
            if segment in self._held:
                self.root.put(lease_key(segment), lease_bytes(segment))

    def release(self, segment: str) -> None:
        """Drop the lease: the attempt committed or gave up (what is left is an orphan for gc's age gate)."""
        with self._lock:
            if segment not in self._held:
                return
            self._held.discard(segment)
            try:
                self.root.delete(lease_key(segment))
            except (OSError, StoreError):
                pass  # a lease left behind goes stale; gc removes it

    def release_all(self) -> None:
        for segment in sorted(self._held):
            self.release(segment)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release_all()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for segment in sorted(self._held):
                    try:
                        self.root.put(lease_key(segment), lease_bytes(segment))
                    except Exception:  # noqa: BLE001 - a missed heartbeat must not kill the writer
                        self.failures += 1
