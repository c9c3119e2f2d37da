"""One place that starts (or joins) the dask cluster a stage fans its work out to (design.md §3).

Extract sends one task per shard, train one task per share of a sweep; both take the same three answers to
"which cluster": none given (a LocalCluster of ``workers`` single-threaded processes on this machine), "slurm"
(``workers`` SLURM jobs of one worker process each, through dask-jobqueue), or a running scheduler's address.
Errors are raised as the calling stage's own error class, in one line that names the fix.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class SlurmResources:
    """What each SLURM worker job asks for (sbatch's --partition, --time, --cpus-per-task, --mem, --gres)."""

    partition: str | None = None
    time_limit: str | None = None  # e.g. 04:00:00 [01:00:00]
    cpus_per_task: int | None = None  # [1]
    mem: str | None = None  # e.g. 32G [4GB]
    gpus: int = 0
    log_directory: str | None = None  # where the jobs' dask-worker-<job>.out/.err go [the current folder]


def dask_client(workers: int, scheduler: str | None, error: type[Exception], missing: str,
                slurm: SlurmResources = SlurmResources()):
    """(client, cluster or None): a client of the scheduler at ``scheduler``, of ``workers`` SLURM jobs
    (``scheduler`` "slurm"), or of a new LocalCluster. ``missing``: the message when dask.distributed is not
    installed. Close the client, then the cluster."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:  # an optional extra: work on one machine does not need it
        raise error(missing) from None
    if scheduler == "slurm":
        cluster = _slurm_cluster(workers, slurm, error)
        return Client(cluster), cluster
    if scheduler:
        try:
            return Client(scheduler, timeout="30s"), None
        except (OSError, TimeoutError) as e:
            raise error(f"cannot reach the dask scheduler at {scheduler} ({e}): start it (`dask scheduler`) or pass "
                        "its address as printed") from None
    # one thread per worker process: tasks set their own torch thread count
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def _slurm_cluster(workers: int, slurm: SlurmResources, error: type[Exception]):
    """dask workers as SLURM jobs (dask-jobqueue): one single-process worker per job, ``workers`` jobs."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise error("--scheduler slurm needs dask-jobqueue: pip install 'probecache[cluster]'") from None
    extra = [f"--gres=gpu:{slurm.gpus}"] if slurm.gpus else []
    cluster = SLURMCluster(
        cores=slurm.cpus_per_task or 1, processes=1, memory=slurm.mem or "4GB", queue=slurm.partition,
        walltime=slurm.time_limit or "01:00:00", job_extra_directives=extra, python=sys.executable,
        # the workers' start-up (imports, model load) must not count against dask's connection timeouts
        worker_extra_args=["--nthreads", "1"],
        log_directory=slurm.log_directory,
    )
    cluster.scale(jobs=workers)
    return cluster
