"""Sweeps on dask (train/distributed.py, train/groups.py): partitioning, per-variant determinism, the plain
values a task returns, and a 2-worker LocalCluster sweep that must equal the local one bit for bit.

One fp32 store of 60 reviews (label carried by one word; train 40 / validation 10 / test 10, shards of 8),
built once per module with the extractor on the tiny random Llama (L+1 = 4 layers, d = 64). The cluster
tests start real worker processes (a few seconds each) and are marked slow.
"""

from __future__ import annotations

import builtins
import json
import pickle
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from probecache.train import distributed
from probecache.train.data import resolve_splits
from probecache.train.errors import TrainError
from probecache.train.groups import fit_groups, group_variants
from probecache.train.options import DASK_MISSING, TrainOptions
from probecache.train.probes import load_probe
from probecache.train.runner import train_run
from probecache.train.sweep import Grid, expand_grid, run_sweep
from typer.testing import CliRunner

from probecache.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory, sentiment_csv, extract_tiny_store):
    return extract_tiny_store(tiny_model, tmp_path_factory.mktemp("sweep-dask"), sentiment_csv, dtype="fp32")


def variants_of(probe: str = "scoring", **grid):
    base = dict(lrs=(1e-2, 3e-2), seeds=(0, 1), batch_sizes=(8,), epochs=2, patience=1)
    return expand_grid(Grid(probe, **{**base, **grid}), 4, 64, 2)


def assert_same_fit(a, b):
    """Two FitResults of one variant are the same to the bit: weights, threshold, metrics, scores, epochs."""
    assert a.variant == b.variant and a.threshold == b.threshold and a.best_epoch == b.best_epoch
    assert a.validation == b.validation
    assert [{k: v for k, v in h.items()} for h in a.history] == b.history
    sa, sb = a.probe.state_dict(), b.probe.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    np.testing.assert_array_equal(a.validation_scores[0], b.validation_scores[0])
    assert a.validation_scores[1] == b.validation_scores[1]
    np.testing.assert_array_equal(a.validation_scores[2], b.validation_scores[2])


# ---- partitioning -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 100])
def test_partition_covers_every_variant_once_in_grid_order(n):
    variants = variants_of(batch_sizes=(8, 16), norms=("none", "rms"), probe="pooling", lrs=(1e-2, 3e-2, 1e-1))
    groups = list(group_variants(variants).values())
    assert len(groups) == 4 and len(variants) == 24
    shares = distributed.partition(variants, n)
    assert len(shares) == min(n, len(variants)) and all(shares)
    flat = [v for share in shares for v in share]
    assert sorted(flat, key=variants.index) == variants and len(flat) == len(variants)
    for share in shares:
        assert share == sorted(share, key=variants.index)  # grid order inside a share
    if n <= len(groups):  # whole groups: every batch still read once per group
        for group in groups:
            assert sum(set(group) <= set(share) for share in shares) == 1
        assert max(map(len, shares)) - min(map(len, shares)) <= max(map(len, groups))
    else:  # groups split into contiguous runs: a configuration's seeds stay together while shares allow
        assert max(map(len, shares)) - min(map(len, shares)) <= 3 if n < 24 else all(len(s) == 1 for s in shares)


def test_partition_of_one_group_splits_its_variants_evenly():
    variants = variants_of(lrs=(1e-2, 3e-2, 1e-1), seeds=(0, 1))  # one group of 6
    assert [len(s) for s in distributed.partition(variants, 2)] == [3, 3]
    assert [len(s) for s in distributed.partition(variants, 4)] == [2, 2, 1, 1]
    assert distributed.partition(variants, 3) == [variants[0:2], variants[2:4], variants[4:6]]
    with pytest.raises(TrainError, match="--workers"):
        distributed.partition(variants, 0)


# ---- determinism: a variant's result does not depend on the variants sharing its pass ---------------------


def test_a_variant_alone_equals_the_same_variant_in_a_shared_pass(store):
    """What makes splitting a group across dask tasks exact: no RNG or state is shared between learners."""
    splits = resolve_splits(store)
    variants = variants_of(epochs=3, patience=1)  # early stopping differs between variants: loops end apart
    together = fit_groups(store, variants, splits, "accuracy", progress=False)
    for v in variants:
        alone = fit_groups(store, [v], splits, "accuracy", progress=False)[v]
        assert_same_fit(alone, together[v])
    # and a half of the group, in reverse order (the other learners built first)
    half = fit_groups(store, variants[:1:-1], splits, "accuracy", progress=False)
    for v in variants[2:]:
        assert_same_fit(half[v], together[v])


def test_a_share_fitted_by_a_task_comes_back_as_the_local_fit(store):
    """fit_share in this process, its reply through pickle (what dask does), rebuilt on the driver."""
    splits = resolve_splits(store)
    variants = variants_of("mha", lrs=(1e-2,), downcasts=(8, 16))
    local = fit_groups(store, variants, splits, "accuracy", progress=False)
    reply = pickle.loads(pickle.dumps(distributed.fit_share(str(store.path), variants, splits, "accuracy", None,
                                                            "cpu", 65536, 0, torch.get_num_threads())))
    for v, plain in zip(variants, reply["results"], strict=True):
        # only plain values cross: numpy arrays, python numbers, strings, the variant spec
        assert all(isinstance(a, np.ndarray) and isinstance(d, str) for a, d in plain["state"].values())
        assert_same_fit(distributed._rebuild(plain, v, torch.device("cpu")), local[v])
    with pytest.raises(TrainError, match="stale worker"):
        distributed._rebuild(reply["results"][0], variants[1], torch.device("cpu"))


def test_bfloat16_tensors_travel_as_their_bits():
    t = torch.randn(3, 5).to(torch.bfloat16)
    a, dtype = distributed._to_numpy(t)
    assert dtype == "bfloat16" and a.dtype == np.int16
    back = distributed._from_numpy(pickle.loads(pickle.dumps(a)), dtype, torch.device("cpu"))
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)


# ---- options and a missing dask ----------------------------------------------------------------------------


def test_executor_options_are_checked(tmp_path):
    with pytest.raises(TrainError, match="--executor must be one of local, dask"):
        TrainOptions("scoring", executor="ray")
    with pytest.raises(TrainError, match="--workers"):
        TrainOptions("scoring", executor="dask", workers=0)
    with pytest.raises(TrainError, match="add --executor dask"):
        TrainOptions("scoring", scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(TrainError, match="linear baseline is fitted in this process"):
        TrainOptions("linear", executor="dask")
    slurm = TrainOptions("scoring", executor="dask", scheduler="slurm")  # dask-jobqueue is a dev dependency
    assert slurm.slurm.mem is None  # each job asks for dask_clusters' defaults unless --mem/--time/--partition


@pytest.fixture
def no_dask(monkeypatch):
    """dask.distributed fails to import, as on an install without the [dask] extra."""
    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name in ("dask", "distributed") or name.startswith(("dask.", "distributed."))):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, globals, locals, fromlist, level)

    for name in [m for m in sys.modules if m in ("dask", "distributed") or m.startswith(("dask.", "distributed."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_dask_is_one_line_naming_the_extra(store, tmp_path, no_dask, one_line_error):
    with pytest.raises(TrainError) as info:
        TrainOptions("scoring", executor="dask")
    assert str(info.value) == DASK_MISSING and "pip install 'probecache[dask]'" in DASK_MISSING
    with pytest.raises(TrainError, match=r"probecache\[dask\]"):  # the sweep itself, if called directly
        run_sweep(store, variants_of(), resolve_splits(store), "accuracy", progress=False, executor="dask")
    result = CliRunner().invoke(app, ["train", "--store", str(store.path), "--probe", "scoring", "--no-progress",
                                      "--runs-dir", str(tmp_path / "runs"), "--executor", "dask"])
    one_line_error(result, "pip install 'probecache[dask]'")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


# ---- a real 2-worker LocalCluster ---------------------------------------------------------------------------


def comparable_results(run_dir) -> list[dict]:
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    return [{k: v for k, v in row.items() if k != "train_seconds_mean"} for row in rows]


def comparable_config(run_dir) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    for key in ("run_id", "created", "seconds", "options"):
        config.pop(key)
    config.pop("decoded_cache", None)  # what the cache served: only with --decoded-cache
    for v in config["variants"]:
        v.pop("train_seconds")
    return config


def assert_same_run(local, dask_run):
    """Same selection, metrics (validation and test, every seed), results table, scores and saved weights."""
    assert comparable_config(dask_run) == comparable_config(local)
    assert json.loads((dask_run / "metrics.json").read_text()) == json.loads((local / "metrics.json").read_text())
    assert comparable_results(dask_run) == comparable_results(local)
    assert pq.read_table(dask_run / "scores.parquet").equals(pq.read_table(local / "scores.parquet"))
    a, _ = load_probe(local / "probe.safetensors")
    b, _ = load_probe(dask_run / "probe.safetensors")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize("grid", [
    dict(lrs=(1e-2, 3e-2), seeds=(0, 1)),  # one group of 4: the group's variants split over 2 shares
    dict(lrs=(1e-2, 3e-2), seeds=(0, 1), batch_sizes=(8, 16)),  # two groups of 4: a whole group per share
], ids=["one-group", "two-groups"])
def test_two_worker_dask_sweep_equals_the_local_sweep(store, tmp_path, grid):
    pytest.importorskip("dask.distributed")
    from dask.distributed import LocalCluster

    base = dict(probe="scoring", runs_dir=str(tmp_path / "runs"), progress=False, test_split="test")
    grid = Grid("scoring", epochs=2, patience=1, **{"batch_sizes": (8,), **grid})
    local = train_run(store, TrainOptions(grid=grid, **base))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask_run = train_run(store, TrainOptions(grid=grid, executor="dask", scheduler=cluster.scheduler_address,
                                                 **base))
        assert len(cluster.workers) == 2
    assert_same_run(local, dask_run)
    options = json.loads((dask_run / "config.json").read_text())["options"]
    assert (options["executor"], options["scheduler"]) == ("dask", cluster.scheduler_address)


@pytest.fixture
def two_threads():
    """The driver on 2 torch threads, its dask workers starting on 1: the tasks must adopt the driver's count
    (scoring weights differ in the last bits between 1 and 2 threads on this store)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_cli_dask_sweep_on_its_own_local_cluster(store, tmp_path, two_threads):
    """`--executor dask --workers 2` starts (and stops) a LocalCluster; one run folder, one results table; the
    workers read through the driver's --decoded-cache and still fit the same probes."""
    runner = CliRunner()
    args = ["train", "--store", str(store.path), "--probe", "scoring", "--lr", "0.01", "--lr", "0.03",
            "--seeds", "2", "--batch-size", "8", "--epochs", "2", "--no-progress"]
    local = runner.invoke(app, [*args, "--runs-dir", str(tmp_path / "local")])
    on_dask = runner.invoke(app, [*args, "--runs-dir", str(tmp_path / "dask"), "--executor", "dask",
                                  "--workers", "2", "--decoded-cache", "64M", "--decoded-cache-dir",
                                  str(tmp_path / "decoded")])
    assert local.exit_code == 0 and on_dask.exit_code == 0, on_dask.output
    (local_run,), (dask_run,) = (list((tmp_path / d).iterdir()) for d in ("local", "dask"))
    assert_same_run(local_run, dask_run)
    options = json.loads((dask_run / "config.json").read_text())["options"]
    assert (options["executor"], options["workers"], options["scheduler"]) == ("dask", 2, None)
    assert [row["n_seeds"] for row in comparable_results(dask_run)] == [2, 2]  # one table, every configuration
    assert list((tmp_path / "decoded").rglob("*.blk"))  # the workers read through the driver's decoded cache
