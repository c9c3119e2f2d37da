"""How shards get run: in this process (optionally one SLURM array task's share), on a dask cluster, or as
a SLURM array job. All of them end in `run_shards`, whose commits are create-if-absent: running a shard
twice (dask retries, a requeued task, two people) wastes time but never duplicates or corrupts anything.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from probecache.store.remote import is_remote

from .config import ExtractConfig
from .errors import ExtractError

EXECUTORS = ("local", "dask", "slurm")
SLURM_MAX_ARRAY = 1000  # SLURM's default MaxArraySize is 1001: array indices 0..1000
CLI_NAMES = {"splits": "split"}  # config fields whose option is spelled differently (repeatable --split)


@dataclass(frozen=True)
class LaunchConfig:
    """Where and by whom shards run; never part of a store's identity."""

    executor: str = "local"
    task_index: int | None = None  # this process's share: shards K, K+N, ... (default $SLURM_ARRAY_TASK_ID)
    num_tasks: int | None = None  # N (default $SLURM_ARRAY_TASK_COUNT)
    workers: int = 2  # dask LocalCluster worker processes
    scheduler: str | None = None  # dask scheduler address, or "slurm" (dask-jobqueue); None = a LocalCluster
    # SLURM array jobs
    partition: str | None = None
    time_limit: str | None = None  # sbatch --time, e.g. 04:00:00
    gpus: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. 32G
    max_parallel: int | None = None  # array throttle (%N)
    dry_run: bool = False  # print the sbatch script instead of submitting it

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            raise ExtractError(f"--executor {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        k, n = self.resolved_task()
        if n is not None and (n < 1 or k is None or not 0 <= k < n):
            raise ExtractError(f"--task-index {k} --num-tasks {n}: need 0 <= task index < num tasks")
        if self.workers < 1:
            raise ExtractError("--workers must be a positive integer")

    def resolved_task(self) -> tuple[int | None, int | None]:
        """(K, N) from the options, else from SLURM's array environment, else (None, None) = all shards."""
        k, n = self.task_index, self.num_tasks
        if k is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
            k = int(os.environ["SLURM_ARRAY_TASK_ID"])
        if n is None and os.environ.get("SLURM_ARRAY_TASK_COUNT") and k is not None and self.task_index is None:
            n = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        if k is not None and n is None:
            raise ExtractError("--task-index needs --num-tasks (how many tasks share the shards)")
        return k, n


def task_shards(pending: list[int], task_index: int | None, num_tasks: int | None) -> list[int]:
    """Task K of N takes the pending shards s with s % N == K.

    Shard ids are fixed by the frozen plan, so the split does not depend on what other tasks have done in
    the meantime; a resubmission with another N still covers every shard (overlaps only cost time).
    """
    if num_tasks is None:
        return list(pending)
    return [s for s in pending if s % num_tasks == task_index]


# ---- dask -------------------------------------------------------------------------------------------------

_WORKER_JOBS: dict[ExtractConfig, object] = {}  # config -> ExtractionJob, kept alive per dask worker process


def _dask_shard(config: ExtractConfig, shard_id: int) -> dict:
    """One dask task: prepare and load the model once per worker process, then run one shard to its commit."""
    from .jobs import open_job, run_shards
    from .prepare import freeze_plan, prepare

    job = _WORKER_JOBS.get(config)
    if job is None:
        prep = prepare(config)
        freeze_plan(prep)  # identical to the driver's plan, or refused
        job = _WORKER_JOBS[config] = open_job(prep)
    before = job.totals.shards
    run_shards(job, [shard_id])
    return {"shard_id": shard_id, "ran": job.totals.shards > before, "pid": os.getpid()}


def run_dask(prep, launch: LaunchConfig, pending: list[int]):
    """One task per pending shard on a dask cluster (a LocalCluster unless --scheduler is given)."""
    from probecache.cluster.dask_clusters import SlurmResources, dask_client

    from .shard import RunTotals

    config = replace(prep.config, progress=False)  # workers log nothing; the driver reports commits
    slurm = SlurmResources(launch.partition, launch.time_limit, launch.cpus_per_task, launch.mem, launch.gpus,
                           str(prep.layout.path / "logs"))  # worker jobs' output next to the store's logs
    client, cluster = dask_client(launch.workers, launch.scheduler, ExtractError,
                                  "--executor dask needs dask.distributed: pip install 'probecache[dask]'", slurm)
    from dask.distributed import as_completed

    try:
        futures = [client.submit(_dask_shard, config, s, key=f"probecache-{prep.store_id}-shard-{s}",
                                 retries=3, pure=False) for s in pending]
        for future in as_completed(futures):
            done = future.result()
            if prep.config.progress:
                print(f"shard {done['shard_id']} committed (worker pid {done['pid']})", file=sys.stderr)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    totals = RunTotals()
    totals.shards = len(pending)
    return totals


# ---- SLURM ------------------------------------------------------------------------------------------------


def cli_args(config: ExtractConfig) -> list[str]:
    """The `probecache extract` options that reproduce ``config`` (every field, paths made absolute)."""
    args: list[str] = []
    for f in fields(config):
        if f.name == "progress":  # tasks log to files: the script passes --no-progress itself
            continue
        value = getattr(config, f.name)
        flag = "--" + CLI_NAMES.get(f.name, f.name).replace("_", "-")
        if f.name in ("root", "data_dir") and value is not None and not is_remote(value):
            value = str(Path(value).expanduser().resolve())
        if f.name == "model" and Path(value).expanduser().exists():
            value = str(Path(value).expanduser().resolve())
        if f.name == "dataset" and ":" in value:
            kind, _, path = value.partition(":")
            value = f"{kind}:{Path(path).expanduser().resolve()}"
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def slurm_script(prep, launch: LaunchConfig, pending: list[int]) -> tuple[str, int]:
    """The sbatch array script for the pending shards, and N (tasks sharing the shards)."""
    n_tasks = min(prep.n_shards, SLURM_MAX_ARRAY)
    indices = sorted({s % n_tasks for s in pending})
    throttle = f"%{launch.max_parallel}" if launch.max_parallel else ""
    logs = prep.layout.path / "logs"
    command = [sys.executable, "-m", "probecache", "extract", *cli_args(prep.config), "--no-progress",
               "--num-tasks", str(n_tasks)]
    directives = [
        f"--job-name=probecache-{prep.store_id[:40]}",
        f"--array={_ranges(indices)}{throttle}",
        f"--output={logs}/slurm-%A_%a.out",
        "--requeue",  # preempted or failed nodes: SLURM reruns the task; committed shards are skipped
        "--signal=B:USR1@120",  # a warning before the time limit: stop after the current batch
        "--ntasks=1",
    ]
    for option, value in (("partition", launch.partition), ("time", launch.time_limit),
                          ("cpus-per-task", launch.cpus_per_task), ("mem", launch.mem)):
        if value:
            directives.append(f"--{option}={value}")
    if launch.gpus:
        directives.append(f"--gres=gpu:{launch.gpus}")
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
             "# Each array task K runs the shards s with s % N == K that are not committed yet; rerunning",
             "# this script (or `probecache extract ... --executor slurm` again) resumes whatever is missing.",
             f"cd {shlex.quote(os.getcwd())}",
             # exec: the signal from --signal=B:... reaches python, which stops after its current batch
             "exec " + " ".join(shlex.quote(c) for c in command) + ' --task-index "$SLURM_ARRAY_TASK_ID"', ""]
    return "\n".join(lines), n_tasks


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array syntax)."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def submit_slurm(prep, launch: LaunchConfig, pending: list[int]) -> str:
    """Write the script into the store's slurm/ folder and sbatch it (or print it with --dry-run)."""
    if not pending:
        return "nothing to submit"
    script, _ = slurm_script(prep, launch, pending)
    if launch.dry_run:
        print(script)
        return script
    folder = prep.layout.path / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    (prep.layout.path / "logs").mkdir(parents=True, exist_ok=True)
    path = folder / f"extract-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.sbatch"
    path.write_text(script)
    try:
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise ExtractError("sbatch not found: run on a SLURM login node, or use --dry-run to see the script") from None
    except subprocess.CalledProcessError as e:
        raise ExtractError(f"sbatch refused {path}: {e.stderr.strip().splitlines()[-1] if e.stderr else e}") from None
    job_id = out.stdout.strip().split(";")[0]
    print(f"submitted SLURM array job {job_id} ({len(pending)} shards; logs in {prep.layout.path / 'logs'})",
          file=sys.stderr)
    return job_id
