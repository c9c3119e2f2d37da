"""`probecache train`, `probecache eval` and `probecache report` as users drive them (typer's CliRunner).

One bf16 store of 60 reviews (label carried by one word; train 40 / validation 10 / test 10, shards of 8) with
logits and raw text, built once per module with the extractor on the tiny random Llama (L+1 = 4 layers, d = 64).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from probecache.train.probes import NORMS, POOLS, PROBES
from probecache.train.runner import ALL_PROBES
from typer.testing import CliRunner

from probecache.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "f1", "macro_f1", "auroc", "auprc", "confusion", "threshold", "n", "at_0.5")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-train")


@pytest.fixture(scope="module")
def store(tiny_model, folder, sentiment_csv, extract_tiny_store) -> str:
    return str(extract_tiny_store(tiny_model, folder / "stores", sentiment_csv, logits=True, store_text=True).path)


@pytest.fixture(scope="module")
def other_store(tiny_model_other_weights, folder, sentiment_csv, extract_tiny_store) -> str:
    return str(extract_tiny_store(tiny_model_other_weights, folder / "other", sentiment_csv).path)


def train(store: str, runs_dir, probe: str, *extra: str):
    return runner.invoke(app, ["train", "--store", store, "--probe", probe, "--epochs", "2", "--no-progress",
                               "--runs-dir", str(runs_dir), *extra])


def run_of(result) -> Path:
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("run: "), result.stdout
    path = Path(last.removeprefix("run: "))
    assert path.is_absolute() and (path / "config.json").is_file() and (path / "metrics.json").is_file()
    return path


@pytest.fixture(scope="module")
def scoring_run(store, folder) -> Path:
    return run_of(train(store, folder / "runs", "scoring", "--lr", "0.03"))


def help_text(*command: str) -> str:
    """The --help screen with the box drawing removed and whitespace collapsed (wrapping never splits a word)."""
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())


# ---- registry <-> CLI <-> docs ------------------------------------------------------------------------------


def test_every_probe_is_listed_in_train_help():
    text = help_text("train")
    match = re.search(r"--probe <str> One of ([a-z, ]+)\.", text)
    assert match, text
    assert [name.strip() for name in match.group(1).split(",")] == list(ALL_PROBES)
    assert f"--pool <list[str]> pooling / mha: {' or '.join(POOLS)} pooling." in text
    assert f"--norm <list[str]> {' or '.join(NORMS)}:" in text


def test_every_probe_is_documented():
    doc = REPO / "docs" / "TRAINING.md"
    if not doc.is_file():
        pytest.skip("docs/TRAINING.md is not written yet")
    text = doc.read_text()
    missing = [name for name in ALL_PROBES if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert not missing, f"docs/TRAINING.md does not mention {missing}"


def test_help_keeps_the_documented_defaults():
    text = help_text("train")
    assert "[default: all]" in text  # --layers
    assert "$PROBECACHE_RUNS" in text  # --runs-dir
    assert "linear 1; muli 0.01..10; tfidf 0.1..10" in text  # --C
    assert "$PROBECACHE_RUNS" in help_text("report")


@pytest.mark.parametrize("probe", ALL_PROBES)
def test_every_probe_trains_from_the_cli(store, folder, probe):
    result = train(store, folder / "each", probe, "--epochs", "1", "--batch-size", "16")
    run_dir = run_of(result)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["probe"] == probe and config["kind"] == ("probe" if probe in PROBES else probe)
    assert "saved probe: validation accuracy" in result.stdout and "(selected)" in result.stdout
    assert "batch/s" not in result.stderr and "it/s" not in result.stderr  # --no-progress


# ---- train / eval / report -----------------------------------------------------------------------------------


def test_train_prints_the_run_last_and_eval_reproduces_its_test_metrics(store, scoring_run):
    metrics = json.loads((scoring_run / "metrics.json").read_text())
    assert metrics["test"] is not None
    result = runner.invoke(app, ["eval", "--run", str(scoring_run), "--store", store, "--split", "test", "--json"])
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.strip().splitlines()  # one JSON object
    out = json.loads(line)
    assert set(METRICS) <= set(out)
    assert {k: out[k] for k in metrics["test"]} == metrics["test"]
    assert out["split"] == "test" and out["run"] == scoring_run.name

    human = runner.invoke(app, ["eval", "--run", str(scoring_run), "--store", store])
    assert human.exit_code == 0, human.output
    assert "auroc" in human.stdout and "n = 10" in human.stdout and "at 0.5" in human.stdout


def test_train_sweep_options(store, folder):
    result = train(store, folder / "sweep", "mha", "--downcast", "8", "--downcast", "16", "--heads", "2",
                   "--norm", "none", "--lr", "0.01", "--batch-size", "32", "--seeds", "2", "--layers", "1-2",
                   "--metric", "f1")
    run_dir = run_of(result)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["layers"] == [1, 2] and config["metric"] == "f1"
    variants = config["variants"]
    assert len(variants) == 4  # 2 downcasts x 2 seeds
    assert {(v["probe_config"]["downcast"], v["train_config"]["seed"]) for v in variants} == \
        {(8, 0), (8, 1), (16, 0), (16, 1)}
    assert all(v["probe_config"]["heads"] == 2 and v["probe_config"]["n_layers"] == 2 for v in variants)
    assert all(v["probe_config"]["norm"] == "none" for v in variants) and config["selected"]["norm"] == "none"
    assert len(json.loads((run_dir / "metrics.json").read_text())["seeds"]) == 2
    assert result.stdout.count("(selected)") == 1


def test_report_writes_report_md(scoring_run, folder, one_line_error):
    result = runner.invoke(app, ["report", "--runs-dir", str(scoring_run.parent)])
    assert result.exit_code == 0, result.output
    report = scoring_run.parent / "report" / "report.md"
    assert report.is_file() and scoring_run.name in report.read_text()
    assert f"md: {report}" in result.stdout
    one_line_error(runner.invoke(app, ["report", "--runs-dir", str(folder / "empty")]))


# ---- user errors: exit 2, one line, no run left behind --------------------------------------------------------


@pytest.mark.parametrize("args,fragments", [
    (["--probe", "svm"], ["unknown probe 'svm'", "pooling, scoring, mha, linear, muli, tfidf"]),
    (["--probe", "scoring", "--layers", "9"], ["--layers '9'", "out of range", "0..3"]),
    (["--probe", "scoring", "--layers", "a-b"], ["--layers 'a-b' is not a layer list"]),
    (["--probe", "scoring", "--metric", "auroc"], ["--metric"]),
    (["--probe", "scoring", "--seeds", "0"], ["--seeds"]),
    (["--probe", "scoring", "--lr", "0"], ["--lr"]),
    (["--probe", "pooling", "--class-weight", "inverse"], ["--class-weight"]),
    (["--probe", "mha", "--downcast", "7"], ["downcast 7"]),
    (["--probe", "scoring", "--norm", "l2"], ["unknown norm 'l2'", "none, rms"]),
    (["--probe", "linear", "--readout", "max"], ["--readout"]),
    (["--probe", "scoring", "--train-split", "nope"], ["--train-split"]),
])
def test_train_user_errors(store, tmp_path, args, fragments, one_line_error):
    result = runner.invoke(app, ["train", "--store", store, "--no-progress", "--runs-dir", str(tmp_path / "runs"),
                                 "--epochs", "1", *args])
    one_line_error(result, *fragments)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_missing_store(tmp_path, one_line_error):
    one_line_error(train(str(tmp_path / "nope"), tmp_path / "runs", "scoring"), "nope", "not a probecache store")
    one_line_error(runner.invoke(app, ["eval", "--run", str(tmp_path), "--store", str(tmp_path / "nope")]), "nope")


def test_store_id_under_root(store, scoring_run):
    path = Path(store)
    result = runner.invoke(app, ["eval", "--run", str(scoring_run), "--store", path.name, "--root", str(path.parent),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["store"] == path.name


def test_eval_user_errors(store, other_store, scoring_run, tmp_path, one_line_error):
    one_line_error(runner.invoke(app, ["eval", "--run", str(tmp_path), "--store", store]),
                   "not a complete probecache run")
    one_line_error(runner.invoke(app, ["eval", "--run", str(scoring_run), "--store", other_store]),
                   "different model", "--model")
    one_line_error(runner.invoke(app, ["eval", "--run", str(scoring_run), "--store", store, "--split", "dev"]),
                   "'dev'", "--split")


@pytest.mark.parametrize("spec", ["3-1", "1--1", "0--1"])
def test_a_layer_spec_never_selects_nothing(store, tmp_path, spec, one_line_error):
    result = train(store, tmp_path / "runs", "scoring", "--layers", spec)
    if result.exit_code == 0:  # a range ending at a negative index means up to that layer from the end
        config = json.loads((run_of(result) / "config.json").read_text())
        assert config["layers"] == ([1, 2, 3] if spec == "1--1" else [0, 1, 2, 3])
        assert spec != "3-1"
    else:
        one_line_error(result, "--layers")
