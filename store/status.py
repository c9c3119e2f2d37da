"""How far an extraction has got, from the store's layout alone (never the model, never array bytes), on any
root: a local folder shows the attempts running on its machines; an object-store URL the committed shards and
the uploads in flight (each holds a lease, store/lease.py).

Every shard is in exactly one state:
    committed      its manifest part exists (the only state readers see)
    in_progress    no part; its newest attempt holds a fresh lease (store/lease.py), or has none and wrote
                   something within ``stale_after`` (a worker is on it)
    failed         no part; its newest attempt left ``logs/<segment>.failed`` (the worker caught an error)
    stale          no part; its newest attempt's lease is stale (its holder is gone), or it has none and went
                   quiet without a failure log (killed: OOM, preemption)
    never_started  no attempt of it exists

What the layout's names mean is store/scan.py's, shared with ``verify`` and ``gc``.
"""

from __future__ import annotations

import calendar
import os
import time

import pyarrow as pa
from probecache.manifests.schema import part_stats

from .lease import read_lease
from .roots import ObjectInfo, Root
from .scan import Attempt, committed_parts, open_store_root, parse_segment, segment_attempts

DEFAULT_STALE_AFTER = 6 * 3600.0
FAILED_SUFFIX = ".failed"
TAIL_LINES = 10
_TAIL_BYTES = 1 << 16  # a traceback ends with the error: the last 64 KiB of a log say what the user needs


def iso_to_epoch(stamp: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def store_status(store: str | os.PathLike | Root, stale_after: float = DEFAULT_STALE_AFTER,
                 now: float | None = None) -> dict:
    """Progress of a store: shard states, examples/tokens committed vs planned, rate and ETA, failures.

    ``stale_after`` (seconds) separates a shard a worker is still writing from one whose worker died:
    the newest attempt's last write (its folder's newest mtime, or its start time) is compared to it.
    """
    root, info = open_store_root(store)
    now = time.time() if now is None else now
    plan = info["plan"]
    n_shards = int(plan["n_shards"])

    parts = committed_parts(root)
    stats = {shard: part_stats(pa.BufferReader(data)) for shard, name in parts.items()
             if (data := root.get(f"manifests/{name}")) is not None}

    # every attempt of a shard: its segment folder, or only its failure log when it died before writing
    _, logs = root.list_dir("logs")
    failed = {n.removesuffix(FAILED_SUFFIX): meta for n, meta in logs.items()
              if n.startswith("shard-") and n.endswith(FAILED_SUFFIX)}
    folders = segment_attempts(root)
    attempts: dict[int, list[Attempt]] = {}
    for attempt in [*folders.values(), *filter(None, map(parse_segment, failed))]:
        if attempt not in attempts.get(attempt.shard_id, []):
            attempts.setdefault(attempt.shard_id, []).append(attempt)

    shards: dict[str, list] = {"committed": sorted(parts), "in_progress": [], "failed": [], "stale": [],
                               "never_started": []}
    for shard in range(n_shards):
        if shard in parts:
            continue
        if shard not in attempts:
            shards["never_started"].append(shard)
            continue
        newest, last_write = _newest_attempt(root, attempts[shard], folders, failed)
        entry = {"shard_id": shard, "segment": newest.name, "started": _iso(newest.started),
                 "idle_seconds": round(now - last_write, 1)}
        # the attempt's lease (store/lease.py) knows better than mtimes: held by a live writer, or by a dead one
        lease = read_lease(root, newest.name, now)
        if newest.name in failed:
            log = f"logs/{newest.name}{FAILED_SUFFIX}"
            shards["failed"].append({**entry, "log": f"{root.url}/{log}", "tail": _tail(root.get(log) or b"")})
        elif lease is not None and lease.fresh:
            shards["in_progress"].append(entry)
        elif lease is None and now - last_write < stale_after:
            shards["in_progress"].append(entry)
        else:
            shards["stale"].append(entry)

    examples = sum(s.get("n_examples", 0) for s in stats.values())
    tokens = sum(s.get("n_tokens", 0) for s in stats.values())
    rate = _rate(stats)
    remaining = max(int(plan.get("n_tokens", 0)) - tokens, 0)
    return {
        "store_id": info.get("store_id", root.name),
        "path": root.url,
        "shards_total": n_shards,
        "shards": shards,
        "counts": {state: len(items) for state, items in shards.items()},
        "complete": len(parts) >= n_shards,
        "examples_committed": examples,
        "examples_planned": int(plan.get("n_examples", 0)),
        "tokens_committed": tokens,
        "tokens_planned": int(plan.get("n_tokens", 0)),
        "tokens_per_second": rate,
        "eta_seconds": None if not rate or not remaining else round(remaining / rate, 1),
        "stale_after_seconds": stale_after,
        "slurm_logs": sorted(n for n in logs if n.startswith("slurm-") and n.endswith(".out")),
    }


def _newest_attempt(root: Root, attempts: list[Attempt], folders: dict[str, Attempt],
                    failed: dict[str, ObjectInfo]) -> tuple[Attempt, float]:
    """The attempt that last did something, and when: start times order attempts of one shard, but two
    started in the same second tie, so the folder's newest write breaks ties (and measures staleness)."""
    best: tuple[float, float, Attempt] | None = None
    for attempt in attempts:
        last = max(attempt.started, root.tree(f"segments/{attempt.name}")[1] if attempt.name in folders else 0.0)
        if attempt.name in failed:
            last = max(last, failed[attempt.name].mtime)
        key = (attempt.started, last, attempt)
        if best is None or key[:2] > best[:2]:
            best = key
    assert best is not None
    return best[2], best[1]


def _tail(data: bytes, lines: int = TAIL_LINES) -> list[str]:
    """The last lines of a log (a traceback ends with the error, which is what the user needs)."""
    return data[-_TAIL_BYTES:].decode(errors="replace").splitlines()[-lines:]


def _rate(stats: dict[int, dict]) -> float | None:
    """Committed tokens per second, across all workers.

    With several parts: the tokens committed after the first commit over the span between first and last
    commit (the first part's tokens were produced before the span began). With one part, or when every
    commit fell in the same second: all tokens over [earliest attempt start, last commit].
    """
    commits = sorted((t, s.get("n_tokens", 0)) for s in stats.values()
                     if (t := iso_to_epoch(s.get("committed_at"))) is not None)
    if not commits:
        return None
    if len(commits) >= 2 and commits[-1][0] > commits[0][0]:
        return round(sum(n for _, n in commits[1:]) / (commits[-1][0] - commits[0][0]), 1)
    starts = [a.started for s in stats.values() if (a := parse_segment(s.get("segment", ""))) is not None]
    if not starts or commits[-1][0] <= min(starts):
        return None
    return round(sum(n for _, n in commits) / (commits[-1][0] - min(starts)), 1)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def format_duration(seconds: float) -> str:
    """3d 4h, 2h 05m, 7m 30s, 12s: short and never misleadingly precise."""
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def format_status(status: dict) -> list[str]:
    """The human report of `probecache store status`."""
    c = status["counts"]
    lines = [
        f"store      {status['store_id']}",
        f"shards     {c['committed']}/{status['shards_total']} committed, {c['in_progress']} in progress, "
        f"{c['failed']} failed, {c['stale']} stale, {c['never_started']} never started",
        f"examples   {status['examples_committed']:,} of {status['examples_planned']:,}"
        f"{_percent(status['examples_committed'], status['examples_planned'])}",
        f"tokens     {status['tokens_committed']:,} of {status['tokens_planned']:,}"
        f"{_percent(status['tokens_committed'], status['tokens_planned'])}",
    ]
    rate = status["tokens_per_second"]
    if status["complete"]:
        lines.append("state      complete")
    elif rate:
        eta = status["eta_seconds"]
        lines.append(f"rate       {rate:,.0f} tok/s; ETA {format_duration(eta) if eta else '-'} at this rate")
    else:
        lines.append("rate       - (not enough commits to measure)")
    for item in status["shards"]["in_progress"]:
        lines.append(f"running    shard {item['shard_id']} ({item['segment']}), "
                     f"last write {format_duration(item['idle_seconds'])} ago")
    for item in status["shards"]["stale"]:
        lines.append(f"stale      shard {item['shard_id']} ({item['segment']}): no write for "
                     f"{format_duration(item['idle_seconds'])} and no failure log (killed?); rerun to resume")
    for item in status["shards"]["failed"]:
        lines.append(f"failed     shard {item['shard_id']} ({item['segment']}), log {item['log']}:")
        lines += [f"             | {line}" for line in item["tail"]]
    if status["slurm_logs"]:
        lines.append(f"slurm logs {len(status['slurm_logs'])} in {status['path']}/logs")
    return lines


def _percent(part: int, whole: int) -> str:
    return f" ({part / whole:.1%})" if whole else ""
