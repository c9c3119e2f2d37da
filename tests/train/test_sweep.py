"""Sweeps (train/sweep.py): grid expansion, auto heads, shared passes, selection on validation, one test read.

One fp32 store of 60 reviews (label carried by one word; train 40 / validation 10 / test 10, shards of 8),
built once per module with the extractor on the tiny random Llama (L+1 = 4 layers, d = 64).
"""

from __future__ import annotations

import numpy as np
import pytest
from probecache.train import groups as groups_module
from probecache.train import sweep as sweep_module
from probecache.train.data import PooledBatches, SplitSpec, resolve_splits, split_examples
from probecache.train.errors import TrainError
from probecache.train.probes import ProbeConfig
from probecache.train.sweep import Grid, auto_heads, expand_grid, run_sweep, summarize
from probecache.train.trainer import TrainConfig, Variant, evaluate, predict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory, sentiment_csv, extract_tiny_store):
    return extract_tiny_store(tiny_model, tmp_path_factory.mktemp("sweep"), sentiment_csv, dtype="fp32")


# ---- auto heads and grid expansion ------------------------------------------------------------------------


@pytest.mark.parametrize("d_inner,heads", [(576 // 32, 2), (18, 2), (72, 8), (8, 8), (12, 4), (6, 2), (7, 1),
                                           (3072 // 8, 8)])
def test_auto_heads(d_inner, heads):
    assert auto_heads(d_inner) == heads


OPTIONS = dict(norms=("none", "rms"), pools=("mean", "max"), downcasts=(8, 16), heads=(None, 2), lrs=(1e-3, 1e-2),
               seeds=(0, 1))


@pytest.mark.parametrize("probe,n", [("pooling", 2 * 2 * 2 * 2), ("scoring", 2 * 2 * 2),
                                     ("mha", 2 * 2 * 2 * 2 * 2 * 2)])
def test_expand_grid_sizes_and_unused_options_collapse(probe, n):
    variants = expand_grid(Grid(probe, epochs=4, patience=2, **OPTIONS), n_layers=4, hidden_size=64, n_classes=2)
    assert len(variants) == n == len(set(variants))
    for v in variants:
        assert isinstance(v, Variant) and v.probe.name == probe and v.probe.n_layers == 4
        assert v.probe.hidden_size == 64 and v.probe.n_classes == 2
        assert (v.train.epochs, v.train.patience, v.train.batch_size) == (4, 2, 32)
        if probe != "mha":  # downcast / heads mean nothing to these probes: one value, the default
            assert (v.probe.downcast, v.probe.heads) == (8, 8)
        if probe == "scoring":
            assert v.probe.pool == "mean"
    # seeds vary fastest: the seeds of one configuration are adjacent, in option order
    assert [v.train.seed for v in variants] == [0, 1] * (n // 2)
    labels = [v.label for v in variants]
    assert labels[0::2] == labels[1::2] and len(set(labels)) == n // 2
    if probe == "mha":  # heads=None resolves per downcast: d_inner 8 -> 8 heads, d_inner 4 -> 4 heads
        assert {(v.probe.downcast, v.probe.heads) for v in variants} == {(8, 8), (8, 2), (16, 4), (16, 2)}
    if probe == "pooling":
        assert {v.probe.pool for v in variants} == {"mean", "max"}
    assert {v.probe.norm for v in variants} == {"none", "rms"}  # every probe normalises (or not) its inputs
    assert {v.probe.norm for v in expand_grid(Grid(probe), 4, 64, 2)} == {"rms"}  # the default


def test_expand_grid_deduplicates_in_order():
    # auto heads for d_inner = 64 / 8 = 8 is 8: heads (None, 8) is one configuration
    assert len(expand_grid(Grid("mha", heads=(None, 8)), 4, 64, 2)) == 1
    # a repeated value is one configuration, kept at its first position
    variants = expand_grid(Grid("scoring", lrs=(1e-2, 1e-3, 1e-2), seeds=(1, 0, 1)), 4, 64, 2)
    assert [(v.train.lr, v.train.seed) for v in variants] == [(1e-2, 1), (1e-2, 0), (1e-3, 1), (1e-3, 0)]
    # the paper's widths: d = 576 with downcast 32 -> d_inner 18 -> 2 heads
    (v,) = expand_grid(Grid("mha", downcasts=(32,)), 31, 576, 2)
    assert (v.probe.d_inner, v.probe.heads) == (18, 2)


def test_expand_grid_rejects_impossible_configurations():
    with pytest.raises(TrainError, match="downcast 7"):
        expand_grid(Grid("mha", downcasts=(7,)), 4, 64, 2)
    with pytest.raises(TrainError, match="--lr"):
        expand_grid(Grid("scoring", lrs=(0.0,)), 4, 64, 2)
    with pytest.raises(TrainError, match="--class-weight"):
        expand_grid(Grid("pooling", class_weights=("inverse",)), 4, 64, 2)


def test_hyperparameters_and_label_exclude_the_seed():
    mha = Variant(ProbeConfig("mha", 4, 64, pool="max", downcast=16, heads=2), TrainConfig(seed=3))
    assert mha.hyperparameters() == {"probe": "mha", "norm": "rms", "pool": "max", "downcast": 16, "heads": 2,
                                     "lr": 1e-3, "weight_decay": 0.01, "batch_size": 32, "class_weight": "none"}
    assert "seed" not in mha.label and mha.label.startswith("probe=mha norm=rms pool=max downcast=16 heads=2")
    raw = Variant(ProbeConfig("mha", 4, 64, pool="max", downcast=16, heads=2, norm="none"), TrainConfig(seed=3))
    assert raw.label != mha.label  # norm is a hyperparameter of its own row
    scoring = Variant(ProbeConfig("scoring", 4, 64), TrainConfig(seed=1))
    assert "pool" not in scoring.hyperparameters() and "downcast" not in scoring.hyperparameters()
    assert Variant(ProbeConfig("pooling", 4, 64, pool="max"), TrainConfig()).hyperparameters()["pool"] == "max"


def test_summarize_mean_and_sample_std():
    stats = summarize([{"accuracy": 0.5, "f1": 0.4, "auroc": None}, {"accuracy": 1.0, "f1": 0.6, "auroc": 0.8}])
    assert stats["accuracy"] == {"mean": 0.75, "std": pytest.approx(np.std([0.5, 1.0], ddof=1))}
    assert stats["auroc"] == {"mean": 0.8, "std": 0.0}  # a None (one class absent) is left out
    assert stats["macro_f1"] == {"mean": None, "std": None}  # absent everywhere
    assert summarize([{"accuracy": 0.9}])["accuracy"] == {"mean": 0.9, "std": 0.0}  # one seed: std 0
    assert set(stats) == {"accuracy", "f1", "macro_f1", "auroc", "auprc"}


# ---- run_sweep ----------------------------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Records every fit_shared group and every batch source run_sweep asks for; can override validation values."""
    record = {"groups": [], "sources": [], "override": {}}
    real_fit, real_source = groups_module.fit_shared, groups_module.batch_source

    def fit_shared(variants, train, validation, metric, *args, **kwargs):
        record["groups"].append((list(variants), train, validation))
        results = real_fit(variants, train, validation, metric, *args, **kwargs)
        for r in results:
            key = (r.variant.train.lr, r.variant.train.seed)
            if key in record["override"]:
                r.validation = dict(r.validation, **{metric: record["override"][key]})
        return results

    def batch_source(store, spec, probe, layers, batch_size, shuffle, *args, **kwargs):
        record["sources"].append((spec, probe, batch_size, shuffle))
        return real_source(store, spec, probe, layers, batch_size, shuffle, *args, **kwargs)

    monkeypatch.setattr(groups_module, "fit_shared", fit_shared)  # the fitting phase (train/groups.py)
    monkeypatch.setattr(groups_module, "batch_source", batch_source)
    monkeypatch.setattr(sweep_module, "batch_source", batch_source)  # the test read after selection
    return record


def _test_reads(record) -> list:
    return [s for s in record["sources"] if s[0].split == "test"]


@pytest.mark.parametrize("values,selected_lr,best_seed", [
    # mean over seeds decides, not the single best seed: lr 0.01 has the best seed (0.95) but mean 0.7
    ({(1e-2, 0): 0.95, (1e-2, 1): 0.45, (5e-2, 0): 0.8, (5e-2, 1): 0.8}, 5e-2, 0),
    # equal means: the first configuration in grid order; within it the seed with the best value
    ({(1e-2, 0): 0.6, (1e-2, 1): 0.9, (5e-2, 0): 0.9, (5e-2, 1): 0.6}, 1e-2, 1),
], ids=["mean-wins", "ties-first"])
def test_selection_by_mean_validation_and_a_single_test_read(store, spy, values, selected_lr, best_seed):
    spy["override"] = values
    variants = expand_grid(Grid("pooling", norms=("none",), lrs=(1e-2, 5e-2), seeds=(0, 1), batch_sizes=(8,),
                                epochs=2), 4, 64, 2)
    outcome = run_sweep(store, variants, resolve_splits(store), "accuracy", progress=False)

    assert [r.variant for r in outcome.results] == variants
    assert [r.variant.train.lr for r in outcome.selected_results] == [selected_lr] * 2
    assert outcome.selected == outcome.selected_results[0].variant.label
    assert outcome.best.variant.train.seed == best_seed and outcome.best in outcome.selected_results
    # one shared pass (same batch size, same tier) for all four variants
    assert len(spy["groups"]) == 1 and spy["groups"][0][0] == variants
    # test is read once, for the selected configuration only
    assert len(_test_reads(spy)) == 1
    # each selected seed is tested at its own threshold, tuned on validation
    test_src = PooledBatches(store, SplitSpec("test"), None, 8, shuffle=False)
    for r, metrics in zip(outcome.selected_results, outcome.test, strict=True):
        pred = predict([r.probe], test_src.epoch(0))
        assert metrics == evaluate(pred.labels, pred.scores[0], r.threshold)
        assert metrics["threshold"] == r.threshold == r.validation["threshold"]
    labels, ids, scores = outcome.scores["test"]
    assert ids == store.manifest(split="test", columns=["example_id"])["example_id"].to_pylist()
    np.testing.assert_array_equal(scores, predict([outcome.best.probe], test_src.epoch(0)).scores[0])
    assert outcome.scores["validation"] is outcome.best.validation_scores
    # the results table: one row per configuration; only the selected one has test numbers
    rows = {row["config"]: row for row in outcome.rows}
    assert len(rows) == 2 and sum(row["selected"] for row in rows.values()) == 1
    for label, row in rows.items():
        lr = row["lr"]
        mean = np.mean([values[(lr, 0)], values[(lr, 1)]])
        assert row["validation_accuracy_mean"] == pytest.approx(mean)
        assert row["validation_accuracy_std"] == pytest.approx(np.std([values[(lr, 0)], values[(lr, 1)]], ddof=1))
        assert row["n_seeds"] == 2 and "seed" not in row
        if label == outcome.selected:
            assert row["selected"] and row["test_accuracy_mean"] == pytest.approx(
                np.mean([t["accuracy"] for t in outcome.test]))
            assert all(row[f"test_{m}_mean"] is not None for m in ("accuracy", "f1", "macro_f1"))
        else:
            assert not row["selected"]
            assert all(row[k] is None for k in row if k.startswith("test_"))
    assert outcome.layer_weights is None  # pooling has no layer weights


@pytest.mark.parametrize("norms,n_groups", [(("none",), 4), (("rms",), 2), (("none", "rms"), 4)])
def test_groups_split_by_batch_size_and_tier(store, spy, norms, n_groups):
    """Raw mean pooling reads the pooled tier, everything else the tokens: one shared pass per (batch size, tier)."""
    grid = Grid("pooling", norms=norms, pools=("mean", "max"), batch_sizes=(8, 16), epochs=1)
    variants = expand_grid(grid, 4, 64, 2)
    outcome = run_sweep(store, variants, resolve_splits(store), "accuracy", progress=False)
    assert [r.variant for r in outcome.results] == variants  # grid order, whatever the groups
    groups = spy["groups"]
    assert len(groups) == n_groups
    assert sorted(variants.index(v) for g in groups for v in g[0]) == list(range(len(variants)))
    for members, train, validation in groups:
        (batch_size,) = {v.train.batch_size for v in members}
        pooled = {v.probe.pool == "mean" and v.probe.norm == "none" for v in members}
        assert len(pooled) == 1 and type(train) is type(validation)
        assert train.tier == ("pooled" if pooled.pop() else "tokens")
        assert train.n_batches == -(-40 // batch_size) and validation.n_batches == -(-10 // batch_size)
    assert len(_test_reads(spy)) == 1


def test_scoring_sweep_layer_weights_on_test_else_validation(store, spy):
    variants = expand_grid(Grid("scoring", lrs=(3e-2,), seeds=(0, 1), batch_sizes=(8,), epochs=2), 2, 64, 2)
    splits = resolve_splits(store)
    outcome = run_sweep(store, variants, splits, "accuracy", layers=[1, 3], progress=False)
    assert outcome.layer_weights.shape == (10, 2)  # test examples x layers read
    np.testing.assert_allclose(outcome.layer_weights.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(outcome.layer_weight_labels, outcome.scores["test"][0])
    test_src = spy["sources"][-1]
    assert test_src[0].split == "test" and test_src[3] is False  # test is never shuffled
    assert test_src[1] == outcome.selected_results[0].variant.probe

    no_test = resolve_splits(store, test=None)
    outcome = run_sweep(store, variants, no_test, "accuracy", layers=[1, 3], progress=False)
    assert outcome.test == [None, None] and "test" not in outcome.scores
    assert outcome.layer_weights.shape == (10, 2)  # from validation instead
    np.testing.assert_array_equal(outcome.layer_weight_labels, split_examples(store, SplitSpec("validation"))[1])
    assert all(row[k] is None for row in outcome.rows for k in row if k.startswith("test_"))


def test_run_sweep_learns_the_task(store):
    """The label is one word of the text: mean pooling of the tiny model's states separates it on validation."""
    variants = expand_grid(Grid("pooling", lrs=(0.3,), batch_sizes=(8,), epochs=8, patience=8), 4, 64, 2)
    outcome = run_sweep(store, variants, resolve_splits(store), "accuracy", progress=False)
    assert outcome.best.validation["accuracy"] >= 0.9 and outcome.best.validation["auroc"] >= 0.9
    assert outcome.test[0]["auroc"] > 0.6
