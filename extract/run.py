"""`extract()`: prepare, freeze the plan, then run the missing shards with the chosen launcher.

Same config -> same store id -> a complete store is a cache hit that writes nothing; a partial store
resumes with only its uncommitted shards. Launchers (extract/launchers.py) differ only in how they call
`run_shards`: here in order, in SLURM array tasks (`--task-index/--num-tasks`), or as dask tasks.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from probecache.store.remote import writable_root
from probecache.store.repair import set_aside_broken_parts
from probecache.store.roots import LocalRoot

from .config import ExtractConfig
from .jobs import open_job, remote_sync, run_shards
from .launchers import LaunchConfig, run_dask, submit_slurm, task_shards
from .prepare import PreparedStore, freeze_plan, log, prepare
from .remote import RemoteSync
from .shard import RunTotals


@dataclass(frozen=True)
class ExtractResult:
    store_path: Path
    store_id: str
    cache_hit: bool  # True when every shard was already committed: nothing was computed or written
    shards_run: int
    shards_total: int
    totals: RunTotals  # what this run committed
    forward_seconds: float  # inside the model's forward passes
    loop_seconds: float  # from the first forward to the last commit (what forward_seconds is compared to)
    wall_seconds: float  # everything, model and data loading included
    submitted: str | None = None  # SLURM job id, or the script for --dry-run
    store_url: str | None = None  # --root URL: where the store is (store_path is then the local staging folder)


def extract(config: ExtractConfig, launch: LaunchConfig | None = None) -> ExtractResult:
    launch = launch or LaunchConfig()
    launch.validate()
    # the root before any data, tokenizer or model work: a URL with credentials or an unknown scheme, a file in
    # the way or a read-only folder is a one-line error now, and every later use (staging, store.json's
    # provenance, the printed store) sees the canonical form (s3://..., never S3:/... taken for a folder)
    config = replace(config, root=writable_root(config.root))
    started = time.time()
    prep = prepare(config)
    # --root URL (extract/remote.py): the remote store's header and commits decide, staging does the work
    remote = remote_sync(prep)
    url = remote.url if remote is not None else None
    if remote is not None:
        remote.pull_header()
    info = prep.stored_info()
    if info and not launch.dry_run:
        _set_aside_broken_parts(prep, remote)  # a part whose segment is gone is no commit: extract it again
    committed = remote.committed() if remote is not None else prep.layout.committed_shards()
    if info and len(committed) == info["plan"]["n_shards"]:
        log(config, f"already extracted: {url or prep.layout.path} ({info['plan']['n_examples']} examples); "
                    "nothing to do")
        n = info["plan"]["n_shards"]
        return ExtractResult(prep.layout.path, prep.store_id, True, 0, n, RunTotals(), 0.0, 0.0, time.time() - started,
                             store_url=url)
    freeze_plan(prep, write=not launch.dry_run)
    if remote is not None and not launch.dry_run:
        remote.publish_header()
        remote.upload_leftovers()
    committed = remote.committed() if remote is not None else prep.layout.committed_shards()
    pending = sorted(set(range(prep.n_shards)) - committed)
    truncated = sum(p.n_tokens < p.n_tokens_original for p in prep.plan)
    log(config, f"store {prep.store_id}: {len(prep.plan)} examples in {prep.n_shards} shards, {len(pending)} to "
                f"extract{f', {truncated} truncated to {config.max_tokens} tokens' if truncated else ''}")
    if launch.executor == "slurm":
        submitted = submit_slurm(prep, launch, pending)
        return ExtractResult(prep.layout.path, prep.store_id, False, 0, prep.n_shards, RunTotals(), 0.0, 0.0,
                             time.time() - started, submitted, store_url=url)
    if launch.executor == "dask":
        totals = run_dask(prep, launch, pending)
        return ExtractResult(prep.layout.path, prep.store_id, False, totals.shards, prep.n_shards, totals, 0.0, 0.0,
                             time.time() - started, store_url=url)
    mine = task_shards(pending, *launch.resolved_task())
    job = open_job(prep, remote)
    try:
        loop_seconds = run_shards(job, mine)
    finally:
        job.writer.close()
        if job.leases is not None:
            job.leases.close()
        if job.encode_pool is not None:
            job.encode_pool.shutdown()
        if remote is not None:
            remote.close()
    result = ExtractResult(prep.layout.path, prep.store_id, False, job.totals.shards, prep.n_shards, job.totals,
                           job.forward_seconds, loop_seconds, time.time() - started, store_url=url)
    log(config, _summary(result))
    if remote is not None:
        log(config, remote.summary())
    return result


def _set_aside_broken_parts(prep: PreparedStore, remote: RemoteSync | None) -> None:
    """Repair by rerun: every committed part whose segment is missing or incomplete (recorded files absent or of
    another size; a deleted manifest folder needs nothing, its shards are simply not committed) is renamed to a
    reserved name readers ignore, so this run extracts its shard again (store/repair.py)."""
    moved = set_aside_broken_parts(remote.remote if remote is not None else LocalRoot(prep.layout.path))
    for item in moved:
        print(f"warning: {item.where}: {item.reason}; moved the commit record aside to {item.moved_to} and "
              f"extracting shard {item.shard_id} again", file=sys.stderr)


def _summary(r: ExtractResult) -> str:
    t = r.totals
    if not t.examples:
        return f"done: {r.store_path} (no new shards)"
    return (f"done: {t.examples:,} examples, {t.tokens:,} tokens in {r.loop_seconds:.1f} s "
            f"({t.tokens / max(r.loop_seconds, 1e-9):,.0f} tok/s, forward passes {r.forward_seconds:.1f} s); "
            f"{t.bytes_stored / 1e6:,.1f} MB stored, activations compressed "
            f"{t.hidden_bytes_raw / t.hidden_bytes_stored:.2f}x, padding {1 - t.tokens / t.padded_tokens:.1%} "
            "of processed tokens")


__all__ = ["ExtractResult", "extract"]
