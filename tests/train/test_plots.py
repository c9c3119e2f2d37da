"""Run plots (train/plots.py): valid PNGs, curves that agree with metrics.py, run directories with files missing.

Fake run directories in the trainer's layout, filled with seeded numpy data: no store, no model, no training.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from probecache.train import plots
from probecache.train.errors import TrainError
from probecache.train.metrics import average_precision, compute_metrics, roc_auc
from probecache.train.plots import plot_layer_curve, plot_layer_weights, plot_pr_roc, write_run_plots

METRIC_NAMES = ("accuracy", "f1", "macro_f1", "auroc", "auprc")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 8_000) -> None:
    """A real, non-blank PNG: magic bytes, decodable by Pillow and matplotlib, more than one colour."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    with Image.open(path) as im:
        im.verify()
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.01


# ---------------------------------------------------------------------------------------------------- fake runs


def fake_scores(rng, n: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative-but-noisy probabilities: (n,) P(class 1) for 2 classes, else (n, C)."""
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, (p[:, 1] if n_classes == 2 else p)


def make_run(runs_dir: Path, run_id: str, *, probe: str = "scoring", n_classes: int = 2, test: bool = True,
             files: tuple[str, ...] = ("scores", "results", "layer_weights", "layer_curve"), seed: int = 0) -> Path:
    """A run directory in the trainer's layout (config/metrics JSON, scores/results/layer parquet files)."""
    rng = np.random.default_rng(seed)
    run = runs_dir / run_id
    run.mkdir(parents=True)
    labels = [f"c{i}" for i in range(n_classes)] if n_classes > 2 else ["safe", "unsafe"]
    n_layers = 9
    config = {"run_id": run_id, "created": "2026-11-29T21:30:00Z", "kind": "probe" if probe != "linear" else "linear",
              "probe": probe, "metric": "f1",
              "store": {"store_id": "s1", "path": "/stores/s1", "model": "tiny", "dataset": "toxic",
                        "label_names": labels, "hidden_size": 16, "n_layers": n_layers},
              "selected": {"lr": 0.001}, "epochs": 3}
    (run / "config.json").write_text(json.dumps(config))

    splits = {"validation": fake_scores(rng, 120, n_classes)}
    if test:
        splits["test"] = fake_scores(rng, 150, n_classes)
    m = {s: compute_metrics(y, p).to_dict() for s, (y, p) in splits.items()}
    summary = {s: {k: {"mean": m[s][k], "std": 0.01} for k in METRIC_NAMES} for s in m}
    metrics = {"validation": m["validation"], "test": m.get("test"), "metric": "f1",
               "seeds": [{"seed": i, "validation": m["validation"], "test": m.get("test")} for i in range(3)],
               "summary": {"validation": summary["validation"], "test": summary.get("test")}}
    (run / "metrics.json").write_text(json.dumps(metrics))

    if "scores" in files:
        cols = {"split": [], "example_id": [], "label": []}
        for split, (y, _) in splits.items():
            cols["split"] += [split] * len(y)
            cols["example_id"] += [f"{split}-{i}" for i in range(len(y))]
            cols["label"] += y.tolist()
        ps = np.concatenate([p for _, p in splits.values()])
        if n_classes == 2:
            cols["score"] = ps
        else:
            for c in rng.permutation(n_classes):  # column order on disk must not matter
                cols[f"score_{c}"] = ps[:, c]
        pq.write_table(pa.table(cols), run / "scores.parquet")
    if "results" in files:
        res = {"config": ["lr=0.001", "lr=0.0001"], "selected": [True, False], "n_seeds": [3, 3]}
        for k in METRIC_NAMES:
            res |= {f"validation_{k}_mean": [0.8, 0.7], f"validation_{k}_std": [0.01, 0.02],
                    f"test_{k}_mean": [0.79, None], f"test_{k}_std": [0.01, None]}
        pq.write_table(pa.table(res), run / "results.parquet")
    if "layer_weights" in files and probe == "scoring":
        w = rng.dirichlet(np.ones(n_layers), n_classes)
        pq.write_table(pa.table({"class": np.repeat(np.arange(n_classes), n_layers),
                                 "layer": np.tile(np.arange(n_layers), n_classes), "weight": w.ravel()}),
                       run / "layer_weights.parquet")
    if "layer_curve" in files and probe == "linear":
        curve = {"layer": np.arange(n_layers)}
        curve |= {k: rng.uniform(0.5, 0.9, n_layers) for k in METRIC_NAMES}
        curve["selected"] = np.arange(n_layers) == 4
        pq.write_table(pa.table(curve), run / "layer_curve.parquet")
    return run


# ---------------------------------------------------------------------------------------------------- single plots


@pytest.mark.parametrize("n_classes", [2, 4])
def test_layer_weights_png(tmp_path, n_classes):
    rng = np.random.default_rng(1)
    table = pa.table({"class": np.repeat(np.arange(n_classes), 13), "layer": np.tile(np.arange(13), n_classes),
                      "weight": rng.dirichlet(np.ones(13), n_classes).ravel()})
    out = plot_layer_weights(table, ["neg", "pos"], tmp_path / "sub" / "lw.png")  # fewer names than classes
    assert out == tmp_path / "sub" / "lw.png"
    assert_png(out)


def test_layer_weights_accepts_column_mapping_and_rejects_duplicates(tmp_path):
    cols = {"class": [0, 0, 1, 1], "layer": [0, 1, 0, 1], "weight": [0.3, 0.7, 0.6, 0.4]}
    assert_png(plot_layer_weights(cols, None, tmp_path / "lw.png"), min_bytes=4_000)
    cols["layer"] = [0, 0, 0, 1]
    with pytest.raises(ValueError, match="more than one row"):
        plot_layer_weights(cols, None, tmp_path / "dup.png")


def test_layer_curve_png_with_null_auroc(tmp_path):
    rng = np.random.default_rng(2)
    table = pa.table({"layer": np.arange(30)[::-1], "accuracy": rng.uniform(size=30), "f1": rng.uniform(size=30),
                      "macro_f1": rng.uniform(size=30), "auroc": pa.array([None] * 30, pa.float64()),
                      "auprc": rng.uniform(size=30), "selected": np.arange(30)[::-1] == 17})
    assert_png(plot_layer_curve(table, "accuracy", tmp_path / "lc.png"))
    with pytest.raises(ValueError, match="metric must be one of"):
        plot_layer_curve(table, "loss", tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no column 'f1'"):
        plot_layer_curve(table.drop_columns(["f1"]), "f1", tmp_path / "bad.png")


@pytest.mark.parametrize("n_classes", [2, 3, 12])
def test_pr_roc_png(tmp_path, n_classes):
    y, p = fake_scores(np.random.default_rng(3), 300, n_classes)
    assert_png(plot_pr_roc(y, p, [f"class-{i}" for i in range(n_classes)], tmp_path / "pr.png"))


def test_pr_roc_one_class_split_and_bad_input(tmp_path):
    y = np.ones(20, dtype=np.int64)
    assert_png(plot_pr_roc(y, np.linspace(0, 1, 20), None, tmp_path / "one.png"))  # curves undefined, no crash
    with pytest.raises(ValueError, match="N = 20"):
        plot_pr_roc(y, np.zeros(19), None, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="NaN"):
        plot_pr_roc(y, np.full(20, np.nan), None, tmp_path / "bad.png")


def test_drawn_curves_match_metrics():
    """The PR step function integrates to average_precision and the ROC polyline to roc_auc, ties included."""
    rng = np.random.default_rng(4)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        s = np.round(rng.uniform(size=60), 1)  # heavy ties
        recall, precision, fpr, tpr = plots._curves(y, s)
        assert np.sum(np.diff(recall, prepend=0.0) * precision) == pytest.approx(average_precision(y, s))
        trapezoid = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # np.trapezoid needs numpy >= 2
        assert trapezoid == pytest.approx(roc_auc(y, s))
        assert recall[-1] == fpr[-1] == tpr[-1] == 1.0


def test_no_pyplot_figures_left_open(tmp_path):
    import matplotlib.pyplot as plt

    y, p = fake_scores(np.random.default_rng(5), 50, 2)
    plot_pr_roc(y, p, None, tmp_path / "pr.png")
    assert plt.get_fignums() == []


# ---------------------------------------------------------------------------------------------------- run directories


def test_write_run_plots_scoring_run(tmp_path):
    run = make_run(tmp_path, "scoring-1", probe="scoring")
    written = write_run_plots(run)
    assert written == [run / "plots" / "layer_weights.png", run / "plots" / "pr_roc.png"]
    for path in written:
        assert_png(path)


def test_write_run_plots_linear_multiclass_run(tmp_path):
    run = make_run(tmp_path, "linear-1", probe="linear", n_classes=11)
    written = write_run_plots(run)
    assert [p.name for p in written] == ["layer_curve.png", "pr_roc.png"]
    for path in written:
        assert_png(path)


def test_write_run_plots_skips_missing_files(tmp_path):
    run = make_run(tmp_path, "bare", files=())
    assert write_run_plots(run) == []
    assert not (run / "plots").exists() or not any((run / "plots").iterdir())
    # no config either: still no error, and scores alone give the PR/ROC figure
    run = make_run(tmp_path, "scores-only", files=("scores",))
    (run / "config.json").unlink()
    assert [p.name for p in write_run_plots(run)] == ["pr_roc.png"]
    with pytest.raises(FileNotFoundError):
        write_run_plots(tmp_path / "nope")


def test_pr_roc_uses_test_rows_else_validation(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(plots, "plot_pr_roc", lambda y, s, names, path, title: seen.append((y, s, title)) or path)
    write_run_plots(make_run(tmp_path, "with-test", n_classes=11))
    write_run_plots(make_run(tmp_path, "val-only", test=False))
    (y_test, s_test, title_test), (y_val, s_val, title_val) = seen
    assert len(y_test) == 150 and "test split" in title_test
    assert len(y_val) == 120 and s_val.ndim == 1 and "validation split" in title_val
    # score_0..score_10 in class order although shuffled on disk: argmax agrees with the written metrics' accuracy
    metrics = json.loads((tmp_path / "with-test" / "metrics.json").read_text())
    assert s_test.shape == (150, 11)
    assert compute_metrics(y_test, s_test).accuracy == metrics["test"]["accuracy"]


def test_malformed_files_raise_naming_the_file(tmp_path):
    run = make_run(tmp_path, "bad-scores", files=())
    pq.write_table(pa.table({"split": ["test"], "example_id": ["a"], "label": [1], "prob": [0.3]}),
                   run / "scores.parquet")
    with pytest.raises(TrainError, match=r"scores\.parquet.*'score'"):
        write_run_plots(run)
    (run / "scores.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(TrainError, match="cannot read"):
        write_run_plots(run)
