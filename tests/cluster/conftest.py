"""Fixtures for tests against a real single-node SLURM cluster (started by `.ci/slurm-up.sh`).

`slurm_cluster` (session) makes sure the cluster answers, starting it when needed; on a developer machine
without root/apt the tests are skipped, under CI (`CI=true`) they fail instead. `sbatch` submits jobs and
cancels whatever is left of them when the test ends; `wait_for_jobs` polls squeue until a job (every
array task) is gone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_UP = REPO / ".ci" / "slurm-up.sh"
USABLE_STATES = {"idle", "mixed", "allocated", "completing"}
BAD_STATES = {"down", "drained", "draining", "drain", "fail", "failing"}


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    nodes: tuple[str, ...]
    cpus: int  # CPUs across the usable nodes: how many 1-CPU tasks can run at once


def _cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


def _node_rows() -> list[tuple[str, str, str, int]] | None:
    """(partition, node, state, cpus) per node from sinfo, or None when sinfo is missing or fails."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = _cmd("sinfo", "-h", "-N", "-o", "%P %N %T %c", timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3].isdigit():
            rows.append((parts[0], parts[1], parts[2], int(parts[3])))
    return rows


def _usable_cluster() -> SlurmCluster | None:
    rows = _node_rows()
    if not rows:
        return None
    default = [r for r in rows if r[0].endswith("*")]  # sinfo marks the default partition with '*'
    rows = [r for r in (default or rows) if r[2] in USABLE_STATES]
    if not rows:
        return None
    return SlurmCluster(partition=rows[0][0].rstrip("*"), nodes=tuple(r[1] for r in rows),
                        cpus=sum(r[3] for r in rows))


def _start_cluster() -> str | None:
    """Run .ci/slurm-up.sh; None on success, else why it failed."""
    if shutil.which("bash") is None:
        return "bash is not available to run .ci/slurm-up.sh"
    try:
        out = _cmd("bash", str(SLURM_UP), timeout=900)
    except subprocess.TimeoutExpired:
        return f"{SLURM_UP} did not finish within 900 s"
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-40:])
        return f"{SLURM_UP} failed (exit {out.returncode}):\n{tail}"
    return None


def _resume_bad_nodes() -> None:
    """Never leave a node down/drained behind (a stuck kill drains it)."""
    for _partition, node, state, _cpus in _node_rows() or []:
        if state.rstrip("*~#!%$@^-") in BAD_STATES:
            _cmd("scontrol", "update", f"nodename={node}", "state=resume", timeout=15)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    cluster = _usable_cluster()
    if cluster is None:
        reason = _start_cluster()
        cluster = _usable_cluster() if reason is None else None
        if cluster is None:
            reason = reason or "slurm-up.sh succeeded but sinfo shows no usable node"
            if os.environ.get("CI") == "true":
                pytest.fail(f"SLURM cluster unavailable: {reason}")
            pytest.skip(f"SLURM cluster unavailable (needs root + apt; CI=true makes this fail): {reason}")
    yield cluster
    _resume_bad_nodes()


def _job_gone(job_id: str) -> tuple[bool, str]:
    out = _cmd("squeue", "-h", "-j", job_id, "-o", "%i %T %r", timeout=15)
    if out.returncode != 0:
        # a job purged by slurmctld (MinJobAge) is an unknown id to squeue
        return "Invalid job id" in out.stderr, out.stderr.strip()
    return out.stdout.strip() == "", out.stdout.strip()


def _wait_for_jobs(job_id: str | int, timeout: float = 60.0) -> None:
    """Poll `squeue -h -j <job_id>` until the job (all its array tasks) has left the queue."""
    job_id = str(job_id)
    deadline = time.monotonic() + timeout
    while True:
        gone, shown = _job_gone(job_id)
        if gone:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"SLURM job {job_id} still queued after {timeout:.0f} s:\n{shown}")
        time.sleep(0.25)


@pytest.fixture
def wait_for_jobs(slurm_cluster) -> Callable[..., None]:
    """`wait_for_jobs(job_id, timeout=60.0)`: block until the job and all its array tasks are gone."""
    return _wait_for_jobs


@pytest.fixture
def sbatch(slurm_cluster) -> Iterator[Callable[..., str]]:
    """`sbatch(*args) -> job_id`: `sbatch --parsable *args`; the test's jobs are scancel-ed at teardown."""
    submitted: list[str] = []

    def submit(*args: str) -> str:
        out = _cmd("sbatch", "--parsable", *args)
        if out.returncode != 0:
            pytest.fail(f"sbatch {' '.join(args)} failed (exit {out.returncode}): {out.stderr.strip()}")
        job_id = out.stdout.strip().split(";")[0]  # --parsable prints "<id>[;<cluster>]"
        submitted.append(job_id)
        return job_id

    yield submit
    if submitted:
        _cmd("scancel", *submitted)
