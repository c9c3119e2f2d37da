"""`--executor slurm` against the real single-node SLURM cluster: submit an array job, scancel one task in
the middle of its shard, resubmit the same command, and end with a store that verifies and holds every
example exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from probecache.store.verify import verify_store

from probecache import open_store

EXE = str(Path(sys.executable).parent / "probecache")


def _extract(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROBECACHE_PAUSE")}
    env.update(env_extra or {})
    return subprocess.run([EXE, "extract", *args], env=env, capture_output=True, text=True, timeout=300)


def _task_state(job_id: str, task: int) -> str:
    out = subprocess.run(["squeue", "-h", "-j", f"{job_id}_{task}", "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def test_array_job_with_a_cancelled_task_then_resubmitted(slurm_cluster, wait_for_jobs, tiny_model, tiny_csv,
                                                           tmp_path):
    args = ["--dataset", f"csv:{tiny_csv}", "--model", str(tiny_model), "--root", str(tmp_path / "stores"),
            "--dtype", "fp32", "--shard-size", "8", "--no-progress"]
    made = _extract([*args, "--root", str(tmp_path / "reference")])
    reference = open_store(made.stdout.split("store: ")[-1].strip())

    dry = _extract([*args, "--executor", "slurm", "--dry-run", "--max-parallel", "2"])
    assert dry.returncode == 0 and "#SBATCH --array=0-3%2" in dry.stdout and "--requeue" in dry.stdout

    # every task pauses 8 s in its writer right after its first example: long enough to cancel one mid-shard
    pause = {"PROBECACHE_PAUSE_AT": "writer-append:8"}
    first = _extract([*args, "--executor", "slurm", "--max-parallel", "2"], pause)
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.split("submitted: ")[1].split()[0]
    store_path = Path(first.stdout.split("store: ")[-1].strip())
    deadline = time.time() + 120
    while time.time() < deadline:  # task 1 running and its attempt folder exists: it is mid-shard
        if _task_state(job_id, 1) == "RUNNING" and list((store_path / "segments").glob("shard-00001-*")):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("task 1 never reached the middle of its shard")
    subprocess.run(["scancel", f"{job_id}_1"], check=True)
    wait_for_jobs(job_id, timeout=180)
    store = open_store(store_path)
    assert store.layout.committed_shards() == {0, 2, 3}  # the cancelled task committed nothing

    again = _extract([*args, "--executor", "slurm"])  # the same command, resubmitted
    assert again.returncode == 0, again.stderr
    wait_for_jobs(again.stdout.split("submitted: ")[1].split()[0], timeout=180)
    report = verify_store(store_path)
    assert report.ok, report.problems
    ids = open_store(store_path).manifest()["example_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 30
    for eid in ids:
        assert torch.equal(open_store(store_path).hidden(eid), reference.hidden(eid))
    logs = sorted((store_path / "logs").glob("slurm-*.out"))
    assert len(logs) >= 5  # one per task attempt, in the store's logs/ folder
    finished = _extract([*args, "--executor", "slurm"])  # complete: a cache hit, nothing submitted
    assert finished.returncode == 0 and "submitted" not in finished.stdout
