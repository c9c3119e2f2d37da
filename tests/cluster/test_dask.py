"""The dask launcher on a real LocalCluster: a clean run, and a worker killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from probecache.extract.launchers import LaunchConfig
from probecache.extract.run import extract
from probecache.store.verify import verify_store

from probecache import open_store

distributed = pytest.importorskip("dask.distributed")


def test_dask_local_cluster_extracts_every_shard_once(extract_config):
    reference = open_store(extract(extract_config(root=str(extract_config().root) + "-reference")).store_path)
    result = extract(extract_config(), LaunchConfig(executor="dask", workers=2))
    store = open_store(result.store_path)
    assert store.store_id == reference.store_id  # the launcher is not part of the identity
    assert verify_store(store.path).ok and store.summary()["complete"]
    for eid in reference.manifest()["example_id"].to_pylist():
        # dask workers run torch with their own thread count: equal up to accumulation order
        torch.testing.assert_close(store.hidden(eid), reference.hidden(eid), rtol=1e-4, atol=1e-4)


def test_killing_a_dask_worker_mid_run_still_completes_the_store(extract_config):
    config = extract_config(shard_size=2)  # 15 shards: time to kill a worker while most are pending
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        # no Client of our own in this process: probecache connects one to the scheduler address
        pids = [worker.process.pid for worker in cluster.workers.values()]
        killed = []

        def kill_after_first_commit():
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                parts = list(Path(config.root).glob("*/manifests/part-*.parquet"))
                if parts:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_after_first_commit, daemon=True)
        watcher.start()
        result = extract(config, LaunchConfig(executor="dask", scheduler=cluster.scheduler_address))
        watcher.join(timeout=5)
    assert killed, "the run finished before a worker could be killed"
    store = open_store(result.store_path)
    report = verify_store(store.path)
    assert report.ok, report.problems
    assert store.summary()["shards_committed"] == 15 and store.manifest().num_rows == 30


def test_dask_workers_as_slurm_jobs_through_dask_jobqueue(slurm_cluster, extract_config):
    pytest.importorskip("dask_jobqueue")
    result = extract(extract_config(shard_size=8), LaunchConfig(executor="dask", scheduler="slurm", workers=2,
                                                                 mem="2GB", time_limit="00:10:00"))
    store = open_store(result.store_path)
    assert verify_store(store.path).ok and store.summary()["complete"] and store.manifest().num_rows == 30
