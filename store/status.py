"""How far an extraction has got, from the store's layout alone (never the model, never array bytes).

Every shard is in exactly one state:
    committed      its manifest part exists (the only state readers see)
    in_progress    no part; its newest attempt holds a fresh lease (store/lease.py), or has none and wrote
                   something within ``stale_after`` (a worker is on it)
    failed         no part; its newest attempt left ``logs/<segment>.failed`` (the worker caught an error)
    stale          no part; its newest attempt's lease is stale (its holder is gone), or it has none and went
                   quiet without a failure log (killed: OOM, preemption)
    never_started  no attempt of it exists

The helpers at the top (opening a store folder, parsing segment names, listing parts and attempts) are
shared with ``verify`` and ``gc`` so the three commands agree on what the layout means.
"""

from __future__ import annotations

import calendar
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from probecache.manifests.schema import PART_NAME, committed_part_files, part_stats

from .header import read_header
from .layout import StoreLayout
from .lease import local_lease

DEFAULT_STALE_AFTER = 6 * 3600.0
FAILED_SUFFIX = ".failed"
TAIL_LINES = 10

# shard-00042-20250101T120000-0123abcd, exactly what the writer names an attempt (layout.segment_name): the
# shard number is zero-padded to 5 digits but may grow beyond. Matched whole (fullmatch: `$` would accept a
# trailing newline), so gc and verify never take a user's folder for one of ours.
_SEGMENT = re.compile(r"shard-(\d{5,})-(\d{8}T\d{6})-([0-9a-f]{8})")


DELETING = ".probecache-deleting-"  # segments/<this><segment>: a segment gc renamed away before removing it
LEGACY_DELETING = ".deleting-"  # older versions; recognised only before an exact segment name


# ---- shared helpers ---------------------------------------------------------------------------------


def open_layout(path: str | Path) -> tuple[StoreLayout, dict]:
    """The layout and parsed store.json of a store folder; StoreError when it is not one."""
    folder = Path(str(path).removeprefix("file://")).expanduser()
    info = read_header(folder)
    return StoreLayout(folder), info


@dataclass(frozen=True)
class Attempt:
    """One attempt of one shard, named by its segment (the folder may not exist if it failed early)."""

    name: str
    shard_id: int
    started: float  # UTC start time from the name (second resolution)


def parse_segment(name: str) -> Attempt | None:
    """The attempt a segment name encodes, or None for a name that is not a segment of ours."""
    m = _SEGMENT.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        return None
    try:
        started = calendar.timegm(time.strptime(m.group(2), "%Y%m%dT%H%M%S"))
    except ValueError:  # 20251399T... has the shape but is no time the writer wrote
        return None
    return Attempt(name, int(m.group(1)), float(started))


def part_files(layout: StoreLayout) -> dict[int, Path]:
    """shard id -> committed part file. Temp files (``.tmp-*``) never match, so they are not commits."""
    return {int(PART_NAME.match(p.name).group(1)): p for p in committed_part_files(layout.manifests)}


def segment_attempts(layout: StoreLayout) -> dict[str, Attempt]:
    """Every real segment folder (hidden names such as ``.probecache-deleting-*`` and symbolic links excluded:
    the writer never makes a link, and gc must never follow one) that parses as an attempt."""
    if not layout.segments.is_dir() or layout.segments.is_symlink():
        return {}
    out = {}
    for entry in os.scandir(layout.segments):
        attempt = parse_segment(entry.name)
        if attempt is not None and entry.is_dir(follow_symlinks=False):
            out[entry.name] = attempt
    return out


def deleting_target(name: str) -> str | None:
    """The segment a half-deleted folder held, for names gc itself made (new or older prefix + exact pattern)."""
    for prefix in (DELETING, LEGACY_DELETING):
        if name.startswith(prefix) and parse_segment(name[len(prefix):]) is not None:
            return name[len(prefix):]
    return None


def segment_links(layout: StoreLayout) -> list[str]:
    """Names in segments/ that are symbolic links (skipped by gc, reported by verify)."""
    if not layout.segments.is_dir() or layout.segments.is_symlink():
        return []
    return sorted(e.name for e in os.scandir(layout.segments) if e.is_symlink())


def newest_mtime(path: Path) -> float:
    """The latest mtime of a folder, its subfolders and files: when its writer last did anything (links are
    not followed: their own mtime counts)."""
    newest = 0.0
    for directory, _, files in os.walk(path):
        for name in [None, *files]:
            try:
                st = os.lstat(directory if name is None else os.path.join(directory, name))
            except FileNotFoundError:  # deleted while we walk (gc, or a writer replacing a file)
                continue
            newest = max(newest, st.st_mtime)
    return newest


def logs_dir(layout: StoreLayout) -> Path:
    return layout.path / "logs"


def failed_logs(layout: StoreLayout) -> dict[str, Path]:
    """segment name -> its ``logs/<segment>.failed`` traceback."""
    folder = logs_dir(layout)
    if not folder.is_dir():
        return {}
    return {p.name.removesuffix(FAILED_SUFFIX): p for p in folder.glob(f"shard-*{FAILED_SUFFIX}")}


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last lines of a text file (a traceback ends with the error, which is what the user needs)."""
    with open(path, "rb") as f:  # read at most the last 64 KiB: a log can be large
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (1 << 16)))
        text = f.read().decode(errors="replace")
    return text.splitlines()[-lines:]


def iso_to_epoch(stamp: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


# ---- status -----------------------------------------------------------------------------------------


def store_status(path: str | Path, stale_after: float = DEFAULT_STALE_AFTER, now: float | None = None) -> dict:
    """Progress of a store: shard states, examples/tokens committed vs planned, rate and ETA, failures.

    ``stale_after`` (seconds) separates a shard a worker is still writing from one whose worker died:
    the newest attempt's last write (its folder's newest mtime, or its start time) is compared to it.
    """
    layout, info = open_layout(path)
    now = time.time() if now is None else now
    plan = info["plan"]
    n_shards = int(plan["n_shards"])

    parts = part_files(layout)
    stats = {shard: part_stats(p) for shard, p in parts.items()}

    # every attempt of a shard: its segment folder, or only its failure log when it died before writing
    failed = failed_logs(layout)
    attempts: dict[int, list[Attempt]] = {}
    for attempt in [*segment_attempts(layout).values(), *filter(None, map(parse_segment, failed))]:
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
        newest, last_write = _newest_attempt(layout, attempts[shard], failed)
        entry = {"shard_id": shard, "segment": newest.name, "started": _iso(newest.started),
                 "idle_seconds": round(now - last_write, 1)}
        # the attempt's lease (store/lease.py) knows better than mtimes: held by a live writer, or by a dead one
        lease = local_lease(layout.path, newest.name, now)
        if newest.name in failed:
            log = failed[newest.name]
            shards["failed"].append({**entry, "log": str(log), "tail": tail(log)})
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
    slurm = sorted(p.name for p in logs_dir(layout).glob("slurm-*.out")) if logs_dir(layout).is_dir() else []
    return {
        "store_id": info.get("store_id", layout.path.name),
        "path": str(layout.path),
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
        "slurm_logs": slurm,
    }


def _newest_attempt(layout: StoreLayout, attempts: list[Attempt], failed: dict[str, Path]) -> tuple[Attempt, float]:
    """The attempt that last did something, and when: start times order attempts of one shard, but two
    started in the same second tie, so the folder's newest write breaks ties (and measures staleness)."""
    best: tuple[float, float, Attempt] | None = None
    for attempt in attempts:
        folder = layout.segments / attempt.name
        last = max(attempt.started, newest_mtime(folder) if folder.is_dir() else 0.0)
        if attempt.name in failed:
            last = max(last, failed[attempt.name].stat().st_mtime)
        key = (attempt.started, last, attempt)
        if best is None or key[:2] > best[:2]:
            best = key
    assert best is not None
    return best[2], best[1]


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
        lines.append(f"slurm logs {len(status['slurm_logs'])} in {Path(status['path']) / 'logs'}")
    return lines


def _percent(part: int, whole: int) -> str:
    return f" ({part / whole:.1%})" if whole else ""
