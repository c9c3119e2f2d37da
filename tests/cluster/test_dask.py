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


def test_train_sweep_on_slurm_workers_equals_the_local_sweep(slurm_cluster, tiny_model, sentiment_csv,
                                                              extract_tiny_store, tmp_path):
    """`train --executor dask --scheduler slurm`: the sweep's shares run in SLURM jobs (dask-jobqueue) and the run
    is the local one: the same selection, metrics and scores."""
    pytest.importorskip("dask_jobqueue")
    import json

    import pyarrow.parquet as pq
    from probecache.cluster.dask_clusters import SlurmResources
    from probecache.train.options import TrainOptions
    from probecache.train.runner import train_run
    from probecache.train.sweep import Grid

    store = extract_tiny_store(tiny_model, tmp_path / "stores", sentiment_csv, dtype="fp32")
    base = dict(probe="scoring", grid=Grid("scoring", lrs=(1e-2, 3e-2), batch_sizes=(8,), epochs=2, patience=1),
                progress=False)
    local = train_run(store, TrainOptions(runs_dir=str(tmp_path / "local"), **base))
    on_slurm = train_run(store, TrainOptions(runs_dir=str(tmp_path / "slurm"), executor="dask", scheduler="slurm",
                                             workers=2, slurm=SlurmResources(mem="2GB", time_limit="00:10:00"),
                                             **base))
    assert json.loads((on_slurm / "metrics.json").read_text()) == json.loads((local / "metrics.json").read_text())
    assert pq.read_table(on_slurm / "scores.parquet").equals(pq.read_table(local / "scores.parquet"))
    options = json.loads((on_slurm / "config.json").read_text())["options"]
    assert options["scheduler"] == "slurm" and options["slurm"]["mem"] == "2GB"
    assert list((tmp_path / "slurm" / "logs").glob("dask-worker-*.err"))  # the jobs' output beside the runs
