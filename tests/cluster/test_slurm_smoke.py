"""Smoke tests of the SLURM features the cluster runner relies on: array jobs, cancelling one array task,
resubmitting a single index, and requeueing a running job. Needs a real cluster (see conftest.py)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def _poll(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _state(job: str) -> str:
    """squeue's state for a job or array task ("RUNNING", "PENDING", ...); "" once it left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=15)
    return out.stdout.strip() if out.returncode == 0 else ""


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_array_job_runs_every_task(slurm_cluster, sbatch, wait_for_jobs, tmp_path):
    job = sbatch("--array=0-3", "--job-name=pc-smoke-array", f"--chdir={tmp_path}",
                 f"--output={tmp_path}/out-%A_%a.txt",
                 "--wrap", f"echo $SLURM_ARRAY_TASK_ID ${{SLURM_ARRAY_TASK_COUNT-unset}} "
                           f"> {tmp_path}/task-$SLURM_ARRAY_TASK_ID")
    wait_for_jobs(job, timeout=60)
    for i in range(4):
        # SLURM_ARRAY_TASK_COUNT is set by Slurm 22.05 (Debian 12's slurm-wlm)
        assert (tmp_path / f"task-{i}").read_text().split() == [str(i), "4"]
        assert (tmp_path / f"out-{job}_{i}.txt").exists()
    assert sorted(p.name for p in tmp_path.glob("task-*")) == [f"task-{i}" for i in range(4)]


# An array task that marks its start, then keeps running (heartbeat every 0.2 s, at most ~20 s) while the
# gate file exists, and marks its end. The test removes the gate to let the surviving tasks finish.
GATED_TASK = (
    "id=$SLURM_ARRAY_TASK_ID; touch started-$id; n=0; "
    "while [ -e gate ] && [ $n -lt 100 ]; do touch alive-$id; sleep 0.2; n=$((n+1)); done; "
    "echo $id > done-$id"
)


def test_cancel_one_array_task_then_resubmit_it(slurm_cluster, sbatch, wait_for_jobs, tmp_path):
    (tmp_path / "gate").touch()
    args = ("--job-name=pc-smoke-cancel", f"--chdir={tmp_path}", f"--output={tmp_path}/out-%A_%a.txt",
            "--wrap", GATED_TASK)
    job = sbatch("--array=0-2", *args)

    _poll(lambda: _state(f"{job}_1") == "RUNNING" and (tmp_path / "started-1").exists(), 30,
          f"array task {job}_1 to start")
    subprocess.run(["scancel", f"{job}_1"], check=True, timeout=15)
    _poll(lambda: _state(f"{job}_1") in ("", "CANCELLED"), 30, f"{job}_1 to be cancelled")
    # the freed CPU goes to the task that was still pending (2 CPUs: tasks 0 and 1 ran first)
    _poll(lambda: all((tmp_path / f"started-{i}").exists() for i in (0, 2)), 30, "tasks 0 and 2 to start")
    (tmp_path / "gate").unlink()
    wait_for_jobs(job, timeout=60)

    assert (tmp_path / "done-0").exists() and (tmp_path / "done-2").exists()
    assert (tmp_path / "started-1").exists() and not (tmp_path / "done-1").exists(), "task 1 was not cancelled"

    again = sbatch("--array=1", *args)  # gate is gone: the resubmitted index runs straight through
    wait_for_jobs(again, timeout=60)
    assert _lines(tmp_path / "done-1") == ["1"]
    assert (tmp_path / f"out-{again}_1.txt").exists()


def test_requeue_restarts_a_running_job(slurm_cluster, sbatch, wait_for_jobs, tmp_path):
    # Every start appends a line; only the first start lingers, until the requeue kills it (bounded at 300 s so
    # a broken requeue fails the test instead of hanging it; a fixed sleep raced the kill on a busy machine).
    # Note: a requeued job waits AuthInfo=cred_expire (10 s in slurm-up.sh; Slurm's default is 120 s) in
    # PENDING/BeginTime before it may start again.
    script = (
        'echo "${SLURM_RESTART_COUNT:-0}" >> starts; '
        'if [ "$(wc -l < starts)" -eq 1 ]; then for i in $(seq 300); do sleep 1; done; fi; echo done >> finished'
    )
    job = sbatch("--requeue", "--job-name=pc-smoke-requeue", f"--chdir={tmp_path}",
                 f"--output={tmp_path}/out-%j.txt", "--open-mode=append", "--wrap", script)
    _poll(lambda: _state(job) == "RUNNING" and _lines(tmp_path / "starts"), 30, f"job {job} to start")

    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=15)
    assert out.returncode == 0, f"scontrol requeue {job} failed: {out.stderr.strip()}"

    _poll(lambda: len(_lines(tmp_path / "starts")) >= 2, 60, f"requeued job {job} to start again")
    wait_for_jobs(job, timeout=60)
    assert _lines(tmp_path / "starts") == ["0", "1"]  # two starts; SLURM_RESTART_COUNT counts requeues
    assert _lines(tmp_path / "finished") == ["done"]  # the first run was killed before it finished
