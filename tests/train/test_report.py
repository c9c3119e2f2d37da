"""Cross-run report (train/report.py): collecting runs, "mean ± std" cells, report files, bad and empty run dirs.

Fake run directories in the trainer's layout with hand-picked summary numbers, so every printed cell is known.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from probecache.train.errors import TrainError
from probecache.train.report import SCHEMA, collect_runs, markdown_table, write_report

METRIC_NAMES = ("accuracy", "f1", "macro_f1", "auroc", "auprc")


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 8_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels[..., :3].std() > 0.01


def make_run(runs_dir: Path, run_id: str, *, dataset: str = "toxic", probe: str = "scoring",
             created: str = "2026-11-29T21:30:00Z", test: dict | None = None, validation: dict | None = None,
             n_seeds: int = 3, metric: str = "f1", scores: bool = True, seed: int = 0) -> Path:
    """A run directory; ``test`` / ``validation`` map metric -> (mean, std) and override the defaults.

    ``test=False`` writes a run never evaluated on test (summary.test null).
    """
    run = runs_dir / run_id
    run.mkdir(parents=True)
    config = {"run_id": run_id, "created": created, "kind": "probe", "probe": probe, "metric": metric,
              "store": {"store_id": f"{dataset}-store", "path": "/x", "model": "tiny-llama", "dataset": dataset,
                        "label_names": ["safe", "unsafe"], "hidden_size": 16, "n_layers": 4},
              "selected": {"lr": 0.001, "downcast": 8}, "ignored": [1, 2]}
    (run / "config.json").write_text(json.dumps(config))

    def summary(overrides):
        values = {m: (0.8, 0.01) for m in METRIC_NAMES} | (overrides or {})
        return {m: {"mean": mean, "std": std} for m, (mean, std) in values.items()}

    m = {"accuracy": 0.8, "f1": 0.8, "macro_f1": 0.8, "auroc": 0.9, "auprc": 0.9, "confusion": [[1, 0], [0, 1]],
         "threshold": 0.5, "n": 2}
    m["at_0.5"] = dict(m)
    has_test = test is not False
    metrics = {"validation": m, "test": m if has_test else None, "metric": metric,
               "seeds": [{"seed": i, "validation": m, "test": m if has_test else None} for i in range(n_seeds)],
               "summary": {"validation": summary(validation), "test": summary(test) if has_test else None}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    if scores:
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, 80)
        s = np.clip(0.35 * y + rng.uniform(0, 0.65, 80), 0, 1)
        pq.write_table(pa.table({"split": ["test"] * 80, "example_id": [str(i) for i in range(80)], "label": y,
                                 "score": s}), run / "scores.parquet")
    return run


@pytest.fixture
def runs(tmp_path) -> Path:
    """Two datasets, three probes, one run without test numbers, one directory that is not a run."""
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "tox-mha", probe="mha", test={"f1": (0.845, 0.012), "auroc": (0.898, 0.004)})
    make_run(runs_dir, "tox-scoring-new", created="2026-11-30T08:00:00Z", test={"auroc": (None, None)})
    make_run(runs_dir, "tox-scoring-old", created="2026-11-28T08:00:00Z", seed=1)
    make_run(runs_dir, "sst-pooling", dataset="sst2", probe="pooling", metric="accuracy", test=False,
             validation={"accuracy": (0.9126, 0.0049)}, n_seeds=1, scores=False)
    (runs_dir / "not-a-run").mkdir()
    (runs_dir / "still-training").mkdir()
    (runs_dir / "still-training" / "config.json").write_text("{}")
    (runs_dir / "notes.txt").write_text("hello")
    return runs_dir


# ---------------------------------------------------------------------------------------------------- collect_runs


def test_collect_runs_rows_columns_and_order(runs):
    table = collect_runs(runs)
    assert table.schema == SCHEMA
    # dataset, then probe, then created
    assert table.column("run_id").to_pylist() == ["sst-pooling", "tox-mha", "tox-scoring-old", "tox-scoring-new"]
    rows = {r["run_id"]: r for r in table.to_pylist()}
    mha = rows["tox-mha"]
    assert (mha["probe"], mha["dataset"], mha["store_id"], mha["model"], mha["metric"]) == (
        "mha", "toxic", "toxic-store", "tiny-llama", "f1")
    assert json.loads(mha["selected"]) == {"lr": 0.001, "downcast": 8}
    assert mha["n_seeds"] == 3 and mha["created"] == "2026-11-29T21:30:00Z"
    assert (mha["test_f1_mean"], mha["test_f1_std"]) == (0.845, 0.012)
    assert mha["validation_auprc_mean"] == 0.8
    assert rows["tox-scoring-new"]["test_auroc_mean"] is None  # null in the summary stays null
    pooling = rows["sst-pooling"]
    assert pooling["n_seeds"] == 1
    assert all(pooling[f"test_{m}_{s}"] is None for m in METRIC_NAMES for s in ("mean", "std"))
    assert pooling["validation_accuracy_mean"] == 0.9126


def test_collect_runs_skips_unreadable_json_with_a_warning(runs):
    (runs / "tox-mha" / "metrics.json").write_text('{"summary": ')
    (runs / "sst-pooling" / "config.json").write_text("[1, 2]")  # valid JSON, not an object
    with pytest.warns(UserWarning) as record:
        table = collect_runs(runs)
    messages = " ".join(str(w.message) for w in record)
    assert "tox-mha" in messages and "sst-pooling" in messages
    assert "not-a-run" not in messages and "still-training" not in messages  # not runs: skipped silently
    assert table.column("run_id").to_pylist() == ["tox-scoring-old", "tox-scoring-new"]


def test_collect_runs_tolerates_missing_fields(tmp_path):
    run = tmp_path / "runs" / "minimal"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.json").write_text('{"summary": {"test": {"f1": {"mean": NaN, "std": 0.1}}}}')
    (row,) = collect_runs(tmp_path / "runs").to_pylist()
    assert row["run_id"] == "minimal"  # the directory name when config has none
    assert row["probe"] is None and row["n_seeds"] is None and row["test_f1_mean"] is None


def test_collect_runs_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_runs(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------- markdown


def test_markdown_cells(runs):
    table = collect_runs(runs)
    md = markdown_table(table, ["run_id", "test_f1", "test_auroc", "validation_accuracy", "selected", "n_seeds"])
    lines = md.strip().splitlines()
    assert lines[0] == "| run_id | test_f1 | test_auroc | validation_accuracy | selected | n_seeds |"
    assert lines[1] == "|---|---:|---:|---:|---|---:|"
    assert len(lines) == 2 + table.num_rows
    by_run = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert by_run["tox-mha"] == "| tox-mha | 84.5 ± 1.2 | .898 ± .004 | 80.0 ± 1.0 | lr=0.001, downcast=8 | 3 |"
    assert by_run["sst-pooling"] == "| sst-pooling | — | — | 91.3 ± 0.5 | lr=0.001, downcast=8 | 1 |"
    assert "| — |" in by_run["tox-scoring-new"]  # AUROC null on test


def test_markdown_headers_single_stats_and_errors():
    table = pa.table({"name": ["a|b", None], "test_auprc_mean": [1.0, 0.05], "test_auprc_std": [None, 0.0],
                      "val_macro_f1_mean": [0.5, None], "val_macro_f1_std": [0.25, 0.1], "other": [1.23456, 2.0]})
    md = markdown_table(table)  # every column; _mean / _std pairs merged
    assert md.splitlines()[0] == "| name | test_auprc | val_macro_f1 | other |"
    assert "| a\\|b | 1.000 | 50.0 ± 25.0 | 1.235 |" in md  # std null -> mean alone; pipes escaped
    assert "| — | .050 ± .000 | — | 2 |" in md
    md = markdown_table(table, {"test_auprc_mean": "AP", "val_macro_f1": "Macro-F1 (val)"})
    assert md.splitlines()[0] == "| AP | Macro-F1 (val) |"
    assert md.splitlines()[2] == "| 1.000 | 50.0 ± 25.0 |"
    with pytest.raises(ValueError, match="no column 'test_f1'"):
        markdown_table(table, ["test_f1"])
    empty = markdown_table(table.slice(0, 0), ["name"])
    assert empty.splitlines() == ["| name |", "|---|"]


# ---------------------------------------------------------------------------------------------------- write_report


def test_write_report(runs):
    out = write_report(runs)
    assert out == {"md": runs / "report" / "report.md", "parquet": runs / "report" / "report.parquet",
                   "png": runs / "report" / "report.png"}
    assert pq.read_table(out["parquet"]).num_rows == 4
    assert_png(out["png"])
    md = out["md"].read_text()
    for run_id in ("tox-mha", "tox-scoring-new", "tox-scoring-old", "sst-pooling"):
        assert f"| {run_id} |" in md
    assert "not-a-run" not in md and "still-training" not in md
    assert md.index("## sst2") < md.index("## toxic")
    toxic = md[md.index("## toxic"):]
    assert toxic.index("### Test") < toxic.index("### Validation")
    assert "84.5 ± 1.2" in toxic and ".898 ± .004" in toxic
    sst = md[md.index("## sst2"):md.index("## toxic")]
    assert "No run of this dataset was evaluated on the test split." in sst
    assert "91.3 ± 0.5" in sst
    # each run's own plots were written and are linked relative to report.md
    assert (runs / "tox-mha" / "plots" / "pr_roc.png").is_file()
    assert "[pr_roc](../tox-mha/plots/pr_roc.png)" in md
    assert not (runs / "sst-pooling" / "plots").exists()  # no scores: nothing to plot, no error


def test_write_report_custom_out_dir_and_broken_plots(runs, tmp_path):
    (runs / "tox-mha" / "scores.parquet").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="no plots for run tox-mha"):
        out = write_report(runs, tmp_path / "elsewhere")
    assert out["md"].parent == tmp_path / "elsewhere"
    assert "| tox-mha |" in out["md"].read_text()
    assert_png(out["png"])


@pytest.mark.parametrize("setup", ["empty", "missing", "only-bad"])
def test_write_report_without_runs(tmp_path, setup):
    runs_dir = tmp_path / "runs"
    if setup != "missing":
        runs_dir.mkdir()
    if setup == "only-bad":
        make_run(runs_dir, "broken", scores=False)
        (runs_dir / "broken" / "config.json").write_text("{not json")
    with pytest.warns(UserWarning) if setup == "only-bad" else nullcontext():
        with pytest.raises(TrainError, match=r"no runs under .*runs: train one with `probecache train --store STORE "
                                             r"--probe NAME`"):
            write_report(runs_dir)
