"""Training runs end to end (train/runner.py, train/runs.py): artifacts, evaluation of saved runs, clear errors.

Stores built once per module with the extractor on the tiny random Llama (L+1 = 4 layers, d = 64) from 60
reviews whose label is carried by one word (train 40 / validation 10 / test 10, shards of 8):

- ``full``: bf16, with next-token logits and raw text (every probe and baseline can train on it);
- ``plain``: bf16, train and test only (validation is carved at train time), no logits, no text;
- ``other``: like ``full`` but extracted with another model's weights (evaluation must refuse it).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from probecache.manifests.schema import committed_part_files
from probecache.store.integrity import file_crc32c
from probecache.train import plots as plots_module
from probecache.train import runner as runner_module
from probecache.train.data import resolve_splits
from probecache.train.errors import TrainError
from probecache.train.probes import PROBES, load_probe
from probecache.train.runner import ALL_PROBES, BASELINES, TrainOptions, evaluate_run, train_run
from probecache.train.sweep import Grid
from probecache.train.trainer import evaluate

METRIC_KEYS = {"accuracy", "f1", "macro_f1", "auroc", "auprc", "confusion", "threshold", "n", "at_0.5"}
LR = {"pooling": 0.1, "scoring": 3e-2, "mha": 1e-2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("runner")


@pytest.fixture(scope="module")
def full(tiny_model, folder, sentiment_csv, extract_tiny_store):
    return extract_tiny_store(tiny_model, folder / "stores", sentiment_csv, logits=True, store_text=True)


@pytest.fixture(scope="module")
def plain(tiny_model, folder, sentiment_csv, extract_tiny_store):
    return extract_tiny_store(tiny_model, folder / "plain", sentiment_csv, splits=("train", "test"))


@pytest.fixture(scope="module")
def other(tiny_model_other_weights, folder, sentiment_csv, extract_tiny_store):
    return extract_tiny_store(tiny_model_other_weights, folder / "other", sentiment_csv, logits=True,
                              store_text=True)


def options(probe: str, runs_dir, **overrides) -> TrainOptions:
    """Probes: three epochs at batch size 32 (evaluate_run reads with the run's own batch size)."""
    grid = None
    if probe in PROBES:
        grid = dict(lrs=(LR[probe],), batch_sizes=(32,), epochs=3, seeds=(0, 1) if probe == "scoring" else (0,))
        grid = Grid(probe, **{**grid, **overrides.pop("grid", {})})
    return TrainOptions(probe=probe, grid=grid, runs_dir=str(runs_dir), progress=False, **overrides)


@pytest.fixture(scope="module")
def trained(full, folder):
    """probe name -> its run folder on ``full`` (trained once per module, on first use)."""
    cache = {}

    def get(probe: str):
        if probe not in cache:
            cache[probe] = train_run(full, options(probe, folder / "runs"))
        return cache[probe]

    return get


def read(run_dir, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


def manifest_ids(store, split: str) -> list[str]:
    return store.manifest(split=split, columns=["example_id"])["example_id"].to_pylist()


# ---- artifacts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe", ALL_PROBES)
def test_run_folder_holds_every_artifact(full, trained, probe):
    run_dir = trained(probe)
    assert run_dir.is_dir() and run_dir.parent.name == "runs" and f"-{probe}-" in run_dir.name
    config, metrics = read(run_dir, "config.json"), read(run_dir, "metrics.json")

    # config.json: provenance down to the exact manifest parts read
    assert config["run_id"] == run_dir.name and config["probe"] == probe
    assert config["kind"] == ("probe" if probe in PROBES else probe) and config["metric"] == "accuracy"
    prov = config["store"]
    assert prov["store_id"] == full.store_id and prov["model_weights"] == full.info["model"]["weights_id"]
    assert (prov["n_layers"], prov["hidden_size"], prov["label_names"]) == (4, 64, ["neg", "pos"])
    parts = committed_part_files(full.layout.manifests)
    assert len(parts) == 8  # one per shard
    assert prov["manifest_parts"] == [{"name": p.name, "bytes": p.stat().st_size, "crc32c": file_crc32c(p)}
                                      for p in parts]
    assert config["selected"]["probe"] == probe and config["threshold"] == metrics["validation"]["threshold"]
    if probe in PROBES:
        assert config["layers"] == [0, 1, 2, 3] and config["selected"]["lr"] == LR[probe]
        assert "seed" not in config["selected"] and config["saved_seed"] in (0, 1)
    elif probe == "linear":
        assert config["layers"] == [config["selected"]["layer"]] and config["selected"]["C"] in config["cs"]
    else:
        assert config["layers"] == [] and config["selected"]["C"] in config["cs"]
    assert config["splits"] == {"train": {"split": "train", "carved": False},
                                "validation": {"split": "validation", "carved": False},
                                "test": {"split": "test", "carved": False}}

    # metrics.json: the saved model's validation and test metrics, each seed, and the summary over seeds
    assert {"validation", "test", "metric", "seeds", "summary"} <= set(metrics)
    for split, n in (("validation", 10), ("test", 10)):
        m = metrics[split]
        assert METRIC_KEYS <= set(m) and m["n"] == n and np.asarray(m["confusion"]).sum() == n
        assert set(m["at_0.5"]) >= METRIC_KEYS - {"at_0.5"} and m["at_0.5"]["threshold"] == 0.5
        assert all(0 <= m[k] <= 1 for k in ("accuracy", "f1", "macro_f1", "auroc", "auprc"))
        assert m["threshold"] == config["threshold"]  # tuned on validation, used on test
    n_seeds = 2 if probe == "scoring" else 1
    assert len(metrics["seeds"]) == n_seeds
    assert metrics["summary"]["test"]["accuracy"]["mean"] == pytest.approx(
        np.mean([s["test"]["accuracy"] for s in metrics["seeds"]]))
    saved = [s for s in metrics["seeds"] if s["seed"] == config.get("saved_seed", 0)]
    assert saved[0]["test"] == metrics["test"] and saved[0]["validation"] == metrics["validation"]

    # probe, scores, results, per-probe parquet files, plots
    assert (run_dir / "probe.safetensors").stat().st_size > 0
    scores = pq.read_table(run_dir / "scores.parquet").to_pylist()
    for split in ("validation", "test"):
        rows = [r for r in scores if r["split"] == split]
        assert [r["example_id"] for r in rows] == manifest_ids(full, split)
        labels = np.array([r["label"] for r in rows])
        # the scores saved are the ones the metrics came from
        assert evaluate(labels, np.array([r["score"] for r in rows]), config["threshold"]) == metrics[split]
    results = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert sum(r["selected"] for r in results) == 1 and results[0]["n_seeds"] == n_seeds
    assert "(selected)" in (run_dir / "results.md").read_text()
    assert (run_dir / "layer_weights.parquet").is_file() == (probe == "scoring")
    assert (run_dir / "layer_curve.parquet").is_file() == (probe == "linear")
    pngs = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert "pr_roc.png" in pngs and all(p.stat().st_size > 1000 for p in (run_dir / "plots").glob("*.png"))
    assert ("layer_weights.png" in pngs) == (probe == "scoring") and ("layer_curve.png" in pngs) == (probe == "linear")
    assert not list(run_dir.glob("*.tmp"))


def test_layer_artifacts(trained):
    weights = pq.read_table(trained("scoring") / "layer_weights.parquet").to_pylist()
    assert {(r["class"], r["layer"]) for r in weights} == {(c, layer) for c in (0, 1) for layer in range(4)}
    for c in (0, 1):  # mean stage-2 attention per class sums to 1 over layers
        assert sum(r["weight"] for r in weights if r["class"] == c) == pytest.approx(1.0, rel=1e-6)
    curve = pq.read_table(trained("linear") / "layer_curve.parquet").to_pylist()
    assert [r["layer"] for r in curve] == [0, 1, 2, 3] and sum(r["selected"] for r in curve) == 1
    selected = read(trained("linear"), "config.json")["selected"]["layer"]
    best = max(curve, key=lambda r: r["accuracy"])
    assert next(r for r in curve if r["selected"])["layer"] == selected
    assert next(r for r in curve if r["selected"])["accuracy"] == best["accuracy"]


def test_baselines_learn_the_task(trained):
    """The label is one word of the text: TF-IDF and the best layer's pooled state both separate it."""
    for probe in ("linear", "tfidf"):
        assert read(trained(probe), "metrics.json")["test"]["accuracy"] >= 0.8


# ---- evaluation of a saved run ----------------------------------------------------------------------------


@pytest.mark.parametrize("probe", ALL_PROBES)
def test_evaluate_run_reproduces_the_test_metrics(full, trained, probe):
    run_dir = trained(probe)
    out = evaluate_run(run_dir, full, "test")
    assert (out.pop("run"), out.pop("store"), out.pop("split")) == (run_dir.name, full.store_id, "test")
    assert out == read(run_dir, "metrics.json")["test"]
    val = evaluate_run(run_dir, full, "validation")
    for key in ("run", "store", "split"):
        val.pop(key)
    assert val == read(run_dir, "metrics.json")["validation"]


def test_evaluate_run_refuses_a_store_of_another_model(trained, other, full):
    for probe in ("scoring", "tfidf"):
        with pytest.raises(TrainError, match=r"different model.*model_weights.*--model"):
            evaluate_run(trained(probe), other, "test")


def test_evaluate_run_bad_inputs(trained, plain, tmp_path):
    with pytest.raises(TrainError, match="not a complete probecache run"):
        evaluate_run(tmp_path, plain, "test")
    with pytest.raises(TrainError, match=r"no committed 'validation' examples"):
        evaluate_run(trained("scoring"), plain, "validation")  # plain carves validation: it has none stored
    # the same model, so compatible, but the inputs a baseline reads are missing from the store
    with pytest.raises(TrainError, match="--logits"):
        evaluate_run(trained("muli"), plain, "test")
    with pytest.raises(TrainError, match="--store-text"):
        evaluate_run(trained("tfidf"), plain, "test")
    # a run evaluates on another store of the same model (here: the same test examples, extracted again)
    out = evaluate_run(trained("linear"), plain, "test")
    assert out["store"] == plain.store_id and out["n"] == 10 and out["threshold"] == read(
        trained("linear"), "config.json")["threshold"]


# ---- options: layers, carving, no test --------------------------------------------------------------------


def test_layer_subset(full, tmp_path):
    run_dir = train_run(full, options("scoring", tmp_path, layers=[1, 3]))
    probe, config = load_probe(run_dir / "probe.safetensors")
    assert config.n_layers == probe.config.n_layers == 2
    assert read(run_dir, "config.json")["layers"] == [1, 3]
    weights = pq.read_table(run_dir / "layer_weights.parquet").to_pylist()
    assert {r["layer"] for r in weights} == {1, 3}
    out = evaluate_run(run_dir, full, "test")
    assert {k: out[k] for k in read(run_dir, "metrics.json")["test"]} == read(run_dir, "metrics.json")["test"]

    linear = train_run(full, options("linear", tmp_path, layers=[0, 2]))
    config = read(linear, "config.json")
    assert config["selected"]["layer"] in (0, 2) and config["layers"] == [config["selected"]["layer"]]
    assert [r["layer"] for r in pq.read_table(linear / "layer_curve.parquet").to_pylist()] == [0, 2]
    out = evaluate_run(linear, full, "test")
    assert {k: out[k] for k in read(linear, "metrics.json")["test"]} == read(linear, "metrics.json")["test"]


def test_carved_validation_does_not_depend_on_the_probe_seed(plain, tmp_path):
    expected = resolve_splits(plain).validation.ids
    seen = []
    for seed in (0, 5):
        run_dir = train_run(plain, options("pooling", tmp_path, grid={"seeds": (seed,)}))
        config = read(run_dir, "config.json")
        assert config["splits"]["validation"] == {"split": "train", "carved": True, "n_examples": 4}
        assert config["splits"]["train"] == {"split": "train", "carved": True, "n_examples": 36}
        rows = pq.read_table(run_dir / "scores.parquet").to_pylist()
        seen.append({r["example_id"] for r in rows if r["split"] == "validation"})
        assert {r["example_id"] for r in rows if r["split"] == "test"} == set(manifest_ids(plain, "test"))
    assert seen[0] == seen[1] == expected


def test_without_a_test_split(full, tmp_path):
    run_dir = train_run(full, options("linear", tmp_path, test_split=None))
    metrics = read(run_dir, "metrics.json")
    assert metrics["test"] is None and metrics["summary"]["test"] is None
    assert metrics["seeds"][0]["test"] is None and metrics["validation"]["n"] == 10
    assert {r["split"] for r in pq.read_table(run_dir / "scores.parquet").to_pylist()} == {"validation"}
    assert read(run_dir, "config.json")["splits"]["test"] is None
    row = pq.read_table(run_dir / "results.parquet").to_pylist()[0]
    assert all(row[k] is None for k in row if k.startswith("test_"))
    assert "pr_roc.png" in {p.name for p in (run_dir / "plots").glob("*.png")}  # validation rows instead


@pytest.mark.parametrize("probe,fix", [("muli", "--logits"), ("tfidf", "--store-text")])
def test_baseline_without_its_inputs_is_a_clear_error_and_leaves_no_run(plain, tmp_path, probe, fix):
    with pytest.raises(TrainError, match=fix):
        train_run(plain, options(probe, tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_train_options_are_checked():
    with pytest.raises(TrainError, match="unknown probe 'svm'.*" + ", ".join(ALL_PROBES)):
        TrainOptions(probe="svm")
    with pytest.raises(TrainError, match="--readout"):
        TrainOptions(probe="linear", readout="max")
    assert set(ALL_PROBES) == set(PROBES) | set(BASELINES)


# ---- failures -------------------------------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("target,error", [("run_sweep", RuntimeError), ("save_probe", RuntimeError),
                                          ("write_metrics", RuntimeError), ("write_results", KeyboardInterrupt)])
def test_a_failed_run_leaves_no_folder(full, tmp_path, monkeypatch, target, error):
    def fail(*args, **kwargs):
        raise error("boom")

    monkeypatch.setattr(runner_module, target, fail)
    with pytest.raises(error, match="boom"):
        train_run(full, options("pooling", tmp_path / "runs"))
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_failed_baseline_leaves_no_folder(full, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module.baselines, "layer_sweep", _boom)
    with pytest.raises(RuntimeError, match="boom"):
        train_run(full, options("linear", tmp_path / "runs"))
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_failed_plot_keeps_the_run(full, tmp_path, monkeypatch):
    monkeypatch.setattr(plots_module, "write_run_plots", _boom)
    with pytest.warns(UserWarning, match="plots for .* failed"):
        run_dir = train_run(full, options("pooling", tmp_path))
    assert (run_dir / "metrics.json").is_file() and (run_dir / "probe.safetensors").is_file()


def test_no_run_folder_when_the_splits_are_wrong(plain, tmp_path):
    with pytest.raises(TrainError, match="--train-split"):
        train_run(plain, options("pooling", tmp_path, train_split="nope"))
    assert not tmp_path.joinpath("runs").exists() and list(tmp_path.iterdir()) == []


def test_evaluate_run_reads_the_batches_the_run_was_scored_with(full, tmp_path, monkeypatch):
    run_dir = train_run(full, options("pooling", tmp_path, grid={"batch_sizes": (3,)}))
    sizes = []
    real = runner_module.batch_source

    def recording(store, spec, probe, layers, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return real(store, spec, probe, layers, batch_size, *args, **kwargs)

    monkeypatch.setattr(runner_module, "batch_source", recording)
    out = evaluate_run(run_dir, full, "validation")
    assert sizes == [3]
    expected = read(run_dir, "metrics.json")["validation"]
    assert {k: out[k] for k in expected} == expected


def test_api_baseline_defaults_match_the_cli(full, tmp_path):
    config = read(train_run(full, options("tfidf", tmp_path)), "config.json")
    assert config["cs"] == list(runner_module.DEFAULT_BASELINE_CS["tfidf"])


# ---- multiclass end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_class(tiny_model, folder, extract_tiny_store):
    """45 texts, three classes each carried by its own word; train 30 / validation 6 / test 9."""
    import csv

    path = folder / "three.csv"
    words = {"red": ["crimson", "scarlet"], "green": ["emerald", "olive"], "blue": ["navy", "azure"]}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "split"])
        for i in range(45):
            label = list(words)[i % 3]
            split = "train" if i < 30 else "validation" if i < 36 else "test"
            w.writerow([f"c{i:02d}", f"the colour is {words[label][i % 2]} {words[label][i % 2]}", label, split])
    return extract_tiny_store(tiny_model, folder / "three", path, store_text=True)


@pytest.mark.parametrize("probe", ["scoring", "linear", "tfidf"])
def test_multiclass_run_and_eval(three_class, tmp_path, probe):
    run_dir = train_run(three_class, options(probe, tmp_path))
    metrics = read(run_dir, "metrics.json")
    assert metrics["test"]["threshold"] is None and len(metrics["test"]["confusion"]) == 3
    scores = pq.read_table(run_dir / "scores.parquet")
    assert {"score_0", "score_1", "score_2"} <= set(scores.column_names)
    probs = np.stack([scores[f"score_{c}"].to_numpy() for c in range(3)], axis=1)
    assert np.allclose(probs.sum(axis=1), 1.0)
    out = evaluate_run(run_dir, three_class, "test")
    assert {k: out[k] for k in metrics["test"]} == metrics["test"]


def test_evaluate_run_refuses_another_prompt_format(trained, tiny_model, folder, sentiment_csv, extract_tiny_store):
    chat = extract_tiny_store(tiny_model, folder / "chat", sentiment_csv, prompt_format="chat")
    with pytest.raises(TrainError, match="--prompt-format raw"):
        evaluate_run(trained("scoring"), chat, "test")
