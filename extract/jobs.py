"""Running shards in one process: load the model once, start the background writer, then extract shards in order
to their commits. The local executor (run.py), SLURM array tasks and each dask worker (launchers.py) all run
their share of the shards through ``open_job`` + ``run_shards``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from probecache.lm.models import load_model, resolve_dtype
from probecache.lm.tokens import pad_token_id
from probecache.store.layout import new_attempt_id
from probecache.store.lease import LeaseKeeper
from probecache.store.remote import is_remote
from probecache.store.roots import LocalRoot
from tqdm.auto import tqdm

from .errors import ExtractError, Interrupted
from .prepare import PreparedStore
from .remote import RemoteSync
from .shard import ExtractionJob, run_shard
from .writer import BackgroundWriter

MAX_TRIES_PER_SHARD = 3  # attempts of one shard in one run whose segment may be lost before the run gives up


def remote_sync(prep: PreparedStore) -> RemoteSync | None:
    if not is_remote(prep.config.root):
        return None
    return RemoteSync(prep.config.root, prep.store_id, prep.layout, progress=prep.config.progress)


def open_job(prep: PreparedStore, remote: RemoteSync | None = None) -> ExtractionJob:
    """Load the model and start the background writer for a prepared, planned store (with ``remote``, or
    one made here for a URL root: dask workers, each uploading its own commits)."""
    model, _ = load_model(prep.source, resolve_dtype(prep.config.dtype, prep.device), prep.device)
    mc = prep.model_config
    # leases live beside the segments they protect: in the store, or in the staging copy of a URL root (whose
    # uploads hold their own leases on the remote store, extract/remote.py)
    leases = LeaseKeeper(LocalRoot(prep.layout.path))
    return ExtractionJob(
        config=prep.config, layout=prep.layout, store_id=prep.store_id, dataset_name=prep.dataset.name,
        label_names=list(prep.dataset.label_names), plan_by_shard=prep.by_shard(), model=model,
        pad_id=pad_token_id(prep.tokenizer), logical_dtype=prep.dtype_name, n_layers=mc.num_hidden_layers + 1,
        hidden_size=mc.hidden_size, vocab_size=mc.vocab_size, writer=BackgroundWriter(),
        remote=remote if remote is not None else remote_sync(prep),
        encode_pool=_encode_pool(prep.config.encode_threads, str(prep.device)), leases=leases,
    )


def encode_threads_for(requested: int | None, device: str) -> int:
    """--encode-threads, resolved: on a CPU device the forward pass already keeps every core busy (a pool only
    adds switching), on a GPU host the cores are idle and compression has to keep up with the GPU."""
    if requested is not None:
        return requested
    return 0 if device.startswith("cpu") else max((os.cpu_count() or 1) - 1, 0)


def _encode_pool(requested: int | None, device: str) -> ThreadPoolExecutor | None:
    threads = encode_threads_for(requested, device)
    return ThreadPoolExecutor(threads, thread_name_prefix="probecache-encode") if threads else None


def run_shards(job: ExtractionJob, shard_ids: list[int]) -> float:
    """Run shards in order with a progress bar; returns the loop's seconds (all commits done).

    SIGTERM / SIGUSR1 (SLURM preemption, `scancel --signal`) stop the loop after the current batch: shards
    already queued for commit are committed, the interrupted one is left uncommitted (rerun resumes it),
    and `Interrupted` is raised.
    """
    config = job.config
    stop = threading.Event()
    todo_examples = sum(len(job.plan_by_shard[s]) for s in shard_ids)
    started = time.perf_counter()
    with _stop_on_signals(stop), tqdm(total=todo_examples, unit="ex", disable=not config.progress,
                                dynamic_ncols=True) as bar:
        tokens_seen = [0]

        def on_batch(batch) -> None:
            tokens_seen[0] += sum(p.n_tokens for p in batch)
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            t = job.totals
            ratio = f"{t.compression():.2f}x" if t.compression() else "-"
            written = (t.bytes_stored + t.in_progress_bytes) / 1e6
            bar.set_postfix_str(f"{tokens_seen[0] / elapsed:,.0f} tok/s, {written:,.1f} MB written, "
                                f"compression {ratio}", refresh=False)
            bar.update(len(batch))

        tries: Counter = Counter()
        todo = list(shard_ids)
        while todo:
            for shard_id in todo:
                tries[shard_id] += 1
                segment = job.layout.segment_name(shard_id, new_attempt_id())
                try:
                    run_shard(job, shard_id, on_batch=on_batch, should_stop=stop.is_set, segment=segment)
                except Interrupted:
                    job.writer.drain()
                    _release_leases(job)
                    if job.remote is not None:
                        job.remote.wait()  # what was committed also reaches the remote store
                    raise
                except BaseException as error:
                    _write_failure_log(job, segment, error)
                    _release_leases(job, drain=True)  # nothing of this attempt will be committed
                    raise
            job.writer.drain()
            # attempts whose segment was deleted or damaged underneath them committed nothing: write them again
            lost = job.take_lost()
            for shard_id, why in lost:
                if tries[shard_id] >= MAX_TRIES_PER_SHARD:
                    raise ExtractError(f"shard {shard_id}: its segment was deleted or changed while it was being "
                                       f"written, {tries[shard_id]} times ({why}): stop whatever removes files "
                                       f"under {job.layout.segments} (a `probecache store gc` older than leases, a "
                                       "cleanup job) and rerun the same command")
                print(f"warning: shard {shard_id}: its segment was deleted or changed while it was being written "
                      f"({why}); nothing was committed, extracting the shard again", file=sys.stderr)
            todo = sorted({shard_id for shard_id, _ in lost})
            if todo:
                bar.total += sum(len(job.plan_by_shard[s]) for s in todo)
        if job.remote is not None:
            job.remote.wait()  # every commit uploaded, or the upload error raised
    return time.perf_counter() - started


def _release_leases(job: ExtractionJob, drain: bool = False) -> None:
    """Drop the leases of this run's attempts: after the writer has finished what it was given (a queued commit
    of an earlier shard must not run unleased), or right away when the writer already failed."""
    if drain:
        try:
            job.writer.drain()
        except BaseException:  # noqa: BLE001 - the error being raised already says what went wrong
            pass
    if job.leases is not None:
        job.leases.release_all()


@contextmanager
def _stop_on_signals(event: threading.Event):
    """SIGTERM/SIGUSR1 set ``event`` while the loop runs (handlers only exist in the main thread)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, lambda *_: event.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write_failure_log(job: ExtractionJob, segment: str, error: BaseException) -> None:
    """logs/<segment>.failed: what `probecache store status` shows for a failed shard."""
    if isinstance(error, KeyboardInterrupt):
        return
    try:
        job.layout.path.joinpath("logs").mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        (job.layout.path / "logs" / f"{segment}.failed").write_text(text)
    except OSError:
        pass  # e.g. the disk is full: the original error matters more than its log
