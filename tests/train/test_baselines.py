"""Baselines (train/baselines.py): linear layer sweep, MULI (L1 on logits), TF-IDF; artifacts; clear errors.

Small synthetic data from a seeded numpy RNG: no store, no model.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from probecache.train.baselines import (
    LogisticModel,
    TfidfModel,
    fit_logistic,
    fit_tfidf,
    layer_sweep,
    read_metadata,
    select_C,
    select_tfidf_C,
)
from probecache.train.errors import TrainError
from probecache.train.metrics import compute_metrics
from safetensors import safe_open
from safetensors.numpy import save_file
from sklearn.feature_extraction.text import TfidfVectorizer


def linear_task(n: int, f: int, informative=(0,), n_classes: int = 2, noise: float = 0.3, seed: int = 0,
                offset: float = 0.0, spread: float = 1.0):
    """x (n, f) float32 with labels driven by a few columns (binary: sign; multiclass: argmax of 3 directions)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    if n_classes == 2:
        w = np.zeros(f)
        w[list(informative)] = np.linspace(1.0, 2.0, len(informative)) * (-1) ** np.arange(len(informative))
        y = (x @ w + noise * rng.normal(size=n) > 0).astype(np.int64)
    else:
        w = np.zeros((f, n_classes))
        for c in range(n_classes):
            w[informative[c % len(informative)], c] = 2.0 if c < len(informative) else 0.0
        y = np.argmax(x @ w + noise * rng.normal(size=(n, n_classes)), axis=1).astype(np.int64)
    return (x * spread + offset).astype(np.float32), y


def accuracy(model, x, y) -> float:
    p = model.predict_proba(x)
    pred = (p >= 0.5).astype(np.int64) if p.ndim == 1 else p.argmax(axis=1)
    return float((pred == y).mean())


# --- linear: layer sweep ---

def planted_layers(n: int, seed: int, planted: int = 3, n_layers: int = 5, d: int = 16):
    """(n, L', d) pooled vectors: only layer ``planted`` carries the label (in 2 of its d dimensions)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_layers, d)).astype(np.float32)
    y = (x[:, planted, 0] - x[:, planted, 5] + 0.2 * rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def test_layer_sweep_picks_the_planted_layer():
    x_train, y_train = planted_layers(300, seed=0)
    x_val, y_val = planted_layers(300, seed=1)
    layers = [0, 4, 8, 12, 16]  # store indices of the 5 slices: slice 3 is layer 12
    sweep = layer_sweep(torch.from_numpy(x_train), y_train, x_val, y_val, layers, 2, metric="accuracy")
    assert sweep.best == 3 and sweep.best_layer == 12 and sweep.layers == layers
    assert len(sweep.models) == len(sweep.validation) == len(sweep.thresholds) == 5
    assert sweep.validation[3]["accuracy"] > 0.9 and sweep.validation[3]["auroc"] > 0.95
    for i in (0, 1, 2, 4):  # noise layers: near chance even at a threshold tuned on validation itself
        assert sweep.validation[i]["auroc"] < 0.7 and sweep.validation[i]["accuracy"] < 0.7
    # each entry is the metrics at that layer's tuned threshold
    best = sweep.best_model
    assert sweep.validation[3] == compute_metrics(y_val, best.predict_proba(x_val[:, 3]), sweep.thresholds[3]).to_dict()


def test_layer_sweep_multiclass_bf16_and_progress():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(240, 3, 8)).astype(np.float32)
    y = np.argmax(x[:, 1, :3] * 3, axis=1).astype(np.int64)  # layer 1 decides among 3 classes
    xt = torch.from_numpy(x[:160]).to(torch.bfloat16)  # widened one layer at a time
    sweep = layer_sweep(xt, y[:160], x[160:], y[160:], [5, 6, 7], 3, metric="accuracy", progress=True)
    assert sweep.best == 1 and sweep.thresholds == [None, None, None]
    assert sweep.validation[1]["accuracy"] > 0.85 and sweep.models[1].coef.shape == (3, 8)


def test_layer_sweep_ties_go_to_the_earlier_layer():
    x, y = planted_layers(100, seed=3, planted=0, n_layers=1)
    x = np.repeat(x, 3, axis=1)  # three identical layers
    sweep = layer_sweep(x, y, x, y, [2, 1, 0], 2)
    assert sweep.best == 0 and sweep.best_layer == 2


# --- MULI: L1 on many features ---

def test_l1_on_many_features_is_sparse_and_learns_the_signal():
    # logits-like features: 2000 columns on a large common offset and scale, 3 of them informative
    x, y = linear_task(500, 2000, informative=(3, 500, 1999), offset=12.0, spread=4.0, seed=4)
    sparse = fit_logistic(x[:300], y[:300], 2, penalty="l1", C=0.05)
    assert np.flatnonzero(sparse.coef[0]).tolist() == [3, 500, 1999]  # exactly the informative columns
    assert accuracy(sparse, x[300:], y[300:]) > 0.9
    model, results = select_C(x[:300], y[:300], x[300:], y[300:], 2, Cs=(0.01, 0.05, 0.2), metric="accuracy",
                              penalty="l1")
    assert [r["C"] for r in results] == [0.01, 0.05, 0.2] and model.penalty == "l1"
    assert results[0]["validation"]["accuracy"] < 0.7  # C = 0.01 prunes every feature: chance
    best = max(results, key=lambda r: r["validation"]["accuracy"])
    assert model.C == best["C"] and best["validation"]["accuracy"] > 0.9
    nonzero = set(np.flatnonzero(model.coef[0]).tolist())
    assert {3, 500, 1999} <= nonzero and len(nonzero) <= 100  # still >= 95 % exact zeros
    dense = fit_logistic(x[:300], y[:300], 2, penalty="l2", C=0.05)
    assert np.count_nonzero(dense.coef) == 2000


def test_l1_multiclass_uses_a_multinomial_model():
    x, y = linear_task(300, 40, informative=(1, 2, 3), n_classes=3, seed=5)
    model = fit_logistic(x[:200], y[:200], 3, penalty="l1", C=0.1)
    assert model.coef.shape == (3, 40) and np.count_nonzero(model.coef) < 60
    assert accuracy(model, x[200:], y[200:]) > 0.8


def test_fits_are_deterministic():
    x, y = linear_task(200, 50, informative=(0, 1), seed=6)
    for penalty in ("l1", "l2"):
        a, b = (fit_logistic(x, y, 2, penalty=penalty, C=0.3, seed=1) for _ in range(2))
        assert np.array_equal(a.coef, b.coef) and np.array_equal(a.intercept, b.intercept)


# --- predictions ---

@pytest.mark.parametrize("n_classes", [2, 3])
def test_predict_proba_shapes_and_range(n_classes):
    x, y = linear_task(150, 10, informative=(0, 1, 2), n_classes=n_classes, seed=7)
    model = fit_logistic(x, y, n_classes)
    p = model.predict_proba(x)
    assert p.dtype == np.float64 and np.all((p >= 0) & (p <= 1))
    if n_classes == 2:
        assert p.shape == (150,) and model.coef.shape == (1, 10) and model.intercept.shape == (1,)
    else:
        assert p.shape == (150, 3) and np.allclose(p.sum(axis=1), 1.0)
    assert model.mean.dtype == model.scale.dtype == model.coef.dtype == np.float32
    assert np.array_equal(model.predict_proba(torch.from_numpy(x)), p)  # torch in, same numbers out
    big = np.repeat(x, 100, axis=0) * 1e3  # saturated logits stay probabilities
    assert np.all((model.predict_proba(big) >= 0) & (model.predict_proba(big) <= 1))


def test_constant_features_get_scale_one():
    x, y = linear_task(100, 4, informative=(0,), seed=8)
    x[:, 2] = 7.0
    model = fit_logistic(x, y, 2)
    assert model.scale[2] == 1.0 and model.mean[2] == 7.0 and np.isfinite(model.predict_proba(x)).all()


def test_balanced_class_weight_raises_positive_recall():
    rng = np.random.default_rng(9)
    n = 600
    y = (rng.random(n) < 0.1).astype(np.int64)  # 10 % positives, overlapping classes
    x = (rng.normal(size=(n, 5)) + y[:, None] * 0.8).astype(np.float32)

    def recall(model):
        pred = model.predict_proba(x) >= 0.5
        return pred[y == 1].mean()

    plain = fit_logistic(x, y, 2)
    balanced = fit_logistic(x, y, 2, class_weight="balanced")
    assert recall(balanced) > recall(plain) + 0.2


def test_select_C_ties_go_to_the_smaller_C():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    x[:, 0] += np.where(y == 1, 2.0, -2.0)  # a wide margin: every C separates validation perfectly
    model, results = select_C(x[:100], y[:100], x[100:], y[100:], 2, Cs=(1.0, 0.1, 10.0), metric="f1")
    assert [r["C"] for r in results] == [1.0, 0.1, 10.0] and model.C == 0.1
    assert all(isinstance(r["threshold"], float) and r["validation"]["threshold"] == r["threshold"] for r in results)
    json.dumps(results)  # plain JSON: goes into run reports as is
    x3, y3 = linear_task(200, 6, informative=(0, 1, 2), n_classes=3, seed=11)
    _, results3 = select_C(x3[:120], y3[:120], x3[120:], y3[120:], 3, Cs=(0.1, 1.0), metric="accuracy")
    assert all(r["threshold"] is None and len(r["validation"]["confusion"]) == 3 for r in results3)


# --- artifacts ---

def forbid_pickle(monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)


@pytest.mark.parametrize("n_classes, penalty", [(2, "l2"), (2, "l1"), (3, "l2")])
def test_logistic_round_trip_without_pickle(tmp_path, monkeypatch, n_classes, penalty):
    x, y = linear_task(150, 12, informative=(0, 1, 2), n_classes=n_classes, seed=12)
    model = fit_logistic(x, y, n_classes, penalty=penalty, C=0.5)
    path = tmp_path / "linear.safetensors"
    model.save(path, metadata={"layer": 12, "task": "toxicity"})
    with safe_open(str(path), framework="np") as f:  # a plain safetensors file, config in its metadata
        assert set(f.keys()) == {"coef", "intercept", "mean", "scale"}
        assert json.loads(f.metadata()["probecache.baseline_config"])["kind"] == "logistic"
    forbid_pickle(monkeypatch)
    loaded = LogisticModel.load(path)
    for name in ("coef", "intercept", "mean", "scale"):
        assert np.array_equal(getattr(loaded, name), getattr(model, name))
    assert (loaded.n_classes, loaded.penalty, loaded.C) == (n_classes, penalty, 0.5)
    assert np.array_equal(loaded.predict_proba(x), model.predict_proba(x))
    assert read_metadata(path) == {"layer": 12, "task": "toxicity"}


def test_load_refuses_files_that_are_not_baselines(tmp_path):
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(TrainError, match="not a probecache baseline"):
        LogisticModel.load(tmp_path / "plain.safetensors")
    with pytest.raises(TrainError, match="not a probecache baseline"):
        TfidfModel.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not a safetensors header at all")
    with pytest.raises(TrainError, match="not a safetensors file"):
        LogisticModel.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        LogisticModel.load(tmp_path / "missing.safetensors")
    tfidf = fit_tfidf(*toy_texts(40, seed=13), 2)
    tfidf.save(tmp_path / "tfidf.safetensors")
    with pytest.raises(TrainError, match="'tfidf' baseline, not a 'logistic'"):
        LogisticModel.load(tmp_path / "tfidf.safetensors")


def test_save_refuses_metadata_that_is_not_json(tmp_path):
    model = fit_logistic(*linear_task(50, 3, seed=14), 2)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        model.save(tmp_path / "m.safetensors", metadata={"array": np.zeros(2)})


# --- TF-IDF ---

GOOD = ["great", "wonderful", "loved", "excellent"]
BAD = ["awful", "terrible", "hated", "boring"]
FILLER = ["the", "movie", "film", "plot", "acting", "was", "really", "quite", "and", "cast", "ending", "music"]


def toy_texts(n: int, seed: int, n_classes: int = 2):
    """Short reviews: one sentiment word (great/awful family) among filler words; 3 classes adds a neutral one."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n).astype(np.int64)
    texts = []
    for label in y:
        words = list(rng.choice(FILLER, size=6))
        if label < 2:
            words.insert(int(rng.integers(0, 6)), str(rng.choice(GOOD if label == 1 else BAD)))
        texts.append(" ".join(words).capitalize() + "!")
    return texts, y


def test_tfidf_learns_great_vs_awful_and_selects_C():
    train, y_train = toy_texts(200, seed=15)
    val, y_val = toy_texts(100, seed=16)
    test, y_test = toy_texts(100, seed=17)
    model, results = select_tfidf_C(train, y_train, val, y_val, 2, Cs=(0.01, 1.0, 10.0), metric="accuracy")
    assert [r["C"] for r in results] == [0.01, 1.0, 10.0]
    assert all(set(r) == {"C", "validation", "threshold"} for r in results)
    assert max(r["validation"]["accuracy"] for r in results) == results[[0.01, 1.0, 10.0].index(model.model.C)][
        "validation"]["accuracy"]
    assert accuracy(model, test, y_test) > 0.95
    assert model.vocabulary["great"] >= 0 and "the movie" in model.vocabulary  # 1-2 grams, lowercased
    assert model.model.coef[0, model.vocabulary["great"]] > 0 > model.model.coef[0, model.vocabulary["awful"]]
    assert np.all(model.model.mean == 0) and np.all(model.model.scale == 1)


def test_tfidf_transform_matches_sklearn_and_multiclass():
    train, y = toy_texts(300, seed=18, n_classes=3)
    model = fit_tfidf(train, y, 3, C=10.0)
    reference = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=50_000).fit(train)
    new = ["A great great film, really!", "awful", "nothing known here", ""]
    assert model.vocabulary == {k: int(v) for k, v in reference.vocabulary_.items()}
    assert (model.transform(train + new) != reference.transform(train + new)).nnz == 0
    p = model.predict_proba(new)
    assert p.shape == (4, 3) and np.allclose(p.sum(axis=1), 1.0)
    assert accuracy(model, *toy_texts(200, seed=19, n_classes=3)) > 0.9


def test_tfidf_round_trip_without_pickle(tmp_path, monkeypatch):
    train, y = toy_texts(120, seed=20)
    model = fit_tfidf(train, y, 2)
    path = tmp_path / "tfidf.safetensors"
    model.save(path, metadata={"dataset": "toy"})
    with safe_open(str(path), framework="np") as f:
        assert set(f.keys()) == {"coef", "intercept", "mean", "scale", "idf"}
    forbid_pickle(monkeypatch)
    loaded = TfidfModel.load(path)
    assert loaded.vocabulary == model.vocabulary and np.array_equal(loaded.idf, model.idf)
    assert (loaded.ngram_range, loaded.lowercase, loaded.sublinear_tf) == ((1, 2), True, True)
    texts = train + ["Great, unseen words: magnifique!", "AWFUL awful"]
    assert np.array_equal(loaded.predict_proba(texts), model.predict_proba(texts))
    assert read_metadata(path) == {"dataset": "toy"}


def test_a_damaged_tfidf_file_is_a_train_error_naming_it(tmp_path):
    model = fit_tfidf(*toy_texts(120, seed=20), 2)
    path = tmp_path / "tfidf.safetensors"
    model.save(path)
    with safe_open(str(path), framework="np") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({**tensors, "idf": tensors["idf"][:-1]}, str(path), metadata=metadata)  # one term short
    with pytest.raises(TrainError, match=r"tfidf\.safetensors: inconsistent TF-IDF baseline .*retrain the run"):
        TfidfModel.load(path)


# --- clear errors ---

@pytest.mark.parametrize("case, message, error", [
    ("single_class", "single class", TrainError),  # the store's data: the user's to fix
    ("missing_class", r"no example of class\(es\) \[2\]", TrainError),
    ("nan", "NaN or infinite", TrainError),  # from the store in every command
    ("inf", "NaN or infinite", TrainError),
    # the caller's arguments: a bug if the CLI ever gets here
    ("length", "100 labels but x has 99 rows", ValueError),
    ("out_of_range", r"must lie in \[0, 1\]", ValueError),
    ("float_labels", "integer class indices", ValueError),
    ("penalty", "penalty must be one of", ValueError),
    ("C", "C must be a positive", ValueError),
])
def test_fit_logistic_errors(case, message, error):
    x, y = linear_task(100, 4, seed=21)
    n_classes, kw = 2, {}
    if case == "single_class":
        y = np.zeros_like(y)
    elif case == "missing_class":
        n_classes = 3
    elif case in ("nan", "inf"):
        x[7, 2] = np.nan if case == "nan" else np.inf
    elif case == "length":
        x = x[:99]
    elif case == "out_of_range":
        y[0] = 2
    elif case == "float_labels":
        y = y.astype(np.float32)
    elif case == "penalty":
        kw = {"penalty": "elasticnet"}
    elif case == "C":
        kw = {"C": 0.0}
    with pytest.raises(error, match=message):
        fit_logistic(x, y, n_classes, **kw)


def test_other_entry_points_reject_bad_inputs():
    x, y = linear_task(100, 4, seed=22)
    with pytest.raises(TrainError, match="single class"):
        select_C(x, np.ones_like(y), x, y, 2)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(TrainError, match="x_val contains NaN"):
        select_C(x, y, bad, y, 2)
    model = fit_logistic(x, y, 2)
    with pytest.raises(ValueError, match="NaN"):
        model.predict_proba(bad)
    with pytest.raises(ValueError, match=r"x must be \(N, 4\)"):
        model.predict_proba(x[:, :3])
    with pytest.raises(ValueError, match="metric must be one of"):
        select_C(x, y, x, y, 2, metric="auroc")
    with pytest.raises(ValueError, match=r"must be \(N, L'=2, d\)"):
        layer_sweep(x[:, None], y, x[:, None], y, [0, 1], 2)
    texts, ty = toy_texts(30, seed=23)
    with pytest.raises(TrainError, match="single class"):
        fit_tfidf(texts, np.zeros_like(ty), 2)
    with pytest.raises(TrainError, match="no usable terms"):
        fit_tfidf(["a", "b", "c", "d"], np.array([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="entry 1 is NoneType"):
        fit_tfidf(["good film", None], np.array([0, 1]), 2)


def test_module_does_not_import_transformers_or_extract():
    # a subprocess: in this one, other tests may already have imported transformers
    code = ("import sys, probecache.train.baselines; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' "
            "or m.startswith('probecache.extract')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
