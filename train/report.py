"""Cross-run report (design.md §2): one table of every run under a runs directory, per dataset.

- :func:`collect_runs`: one row per run directory (``config.json`` + ``metrics.json``), with the mean and
  std over seeds of every metric on test and validation, from ``metrics.json["summary"]``.
- :func:`markdown_table`: a GitHub Markdown table of such rows, each metric as one "mean ± std" cell.
- :func:`write_report`: ``report.md``, ``report.parquet`` and ``report.png`` into ``<runs_dir>/report``,
  plus each run's own plots (:func:`.plots.write_run_plots`).

Decisions:

- A directory without both JSON files is not a run (or not a finished one) and is skipped silently; a run
  whose JSON cannot be parsed is skipped with a warning naming it. One bad run never hides the others, and
  for the same reason a run whose plots fail costs a warning, not the report.
- Numbers are taken from ``summary`` only: a missing split or metric (test not evaluated, AUROC of a
  one-class split, NaN) is null, never 0, and prints as "—".
- Cell format follows the paper's tables: accuracy / F1 / macro-F1 in percent with one decimal
  (``84.5 ± 1.2``), AUROC / AUPRC as fractions with three decimals and no leading zero (``.898 ± .004``).
- Rows sort by dataset, then probe, then creation time (ISO 8601 strings sort chronologically), so the
  report is stable between invocations and diffs cleanly.
- ``report.png`` plots, per dataset, the selection metric most runs of that dataset use, so every bar of a
  panel measures the same thing; on test when any run of the dataset has test numbers, else on validation.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .errors import TrainError
from .plots import DPI, METRIC_LABELS, write_run_plots

__all__ = ["SPLITS", "collect_runs", "markdown_table", "write_report"]

SPLITS = ("test", "validation")
_PERCENT = ("accuracy", "f1", "macro_f1")  # printed x100 with one decimal; the rest as .3f fractions
_NULL = "—"
_INFO_FIELDS = [("run_id", pa.string()), ("created", pa.string()), ("probe", pa.string()),
                ("dataset", pa.string()), ("store_id", pa.string()), ("model", pa.string()),
                ("metric", pa.string()), ("selected", pa.string()), ("n_seeds", pa.int64())]
SCHEMA = pa.schema(_INFO_FIELDS + [(f"{split}_{m}_{stat}", pa.float64()) for split in SPLITS
                                   for m in METRIC_LABELS for stat in ("mean", "std")])
"""Columns of :func:`collect_runs` (and of report.parquet)."""


# ---------------------------------------------------------------------------------------------------- collecting


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if np.isfinite(value) else None  # json.loads accepts NaN / Infinity: treat as absent


def _text(value) -> str | None:
    return None if value is None else str(value)


def _row(run_dir: Path, config: dict, metrics: dict) -> dict:
    store = config.get("store") if isinstance(config.get("store"), dict) else {}
    seeds = metrics.get("seeds")
    selected = config.get("selected")
    row = {
        "run_id": _text(config.get("run_id")) or run_dir.name,
        "created": _text(config.get("created")),
        "probe": _text(config.get("probe") or config.get("kind")),
        "dataset": _text(store.get("dataset")),
        "store_id": _text(store.get("store_id")),
        "model": _text(store.get("model")),
        "metric": _text(config.get("metric") or metrics.get("metric")),
        "selected": None if selected is None else json.dumps(selected),
        "n_seeds": len(seeds) if isinstance(seeds, list) else None,
    }
    summary = metrics.get("summary") if isinstance(metrics.get("summary"), dict) else {}
    for split in SPLITS:
        per_metric = summary.get(split) if isinstance(summary.get(split), dict) else {}
        for m in METRIC_LABELS:
            stats = per_metric.get(m) if isinstance(per_metric.get(m), dict) else {}
            for stat in ("mean", "std"):
                row[f"{split}_{m}_{stat}"] = _number(stats.get(stat))
    return row


def _scan(runs_dir: Path) -> list[tuple[Path, dict]]:
    """(run directory, row) for every readable run under ``runs_dir``, in report order."""
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory {runs_dir} does not exist")
    found = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not ((run_dir / "config.json").is_file() and (run_dir / "metrics.json").is_file()):
            continue  # not a run, or one still training
        try:
            config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
            metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            if not isinstance(config, dict) or not isinstance(metrics, dict):
                raise ValueError("expected a JSON object")
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            warnings.warn(f"skipping run {run_dir.name} ({run_dir}): unreadable JSON: {exc}", stacklevel=3)
            continue
        found.append((run_dir, _row(run_dir, config, metrics)))
    found.sort(key=lambda item: tuple(item[1][k] or "" for k in ("dataset", "probe", "created", "run_id")))
    return found


def collect_runs(runs_dir: str | Path) -> pa.Table:
    """One row per run under ``runs_dir`` (columns: :data:`SCHEMA`), sorted by dataset, probe, created."""
    rows = [row for _, row in _scan(Path(runs_dir))]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


# ---------------------------------------------------------------------------------------------------- markdown


def _metric_of(name: str) -> str | None:
    """The metric a column measures ("test_macro_f1_mean" -> "macro_f1"), or None."""
    base = name.removesuffix("_mean").removesuffix("_std")
    for m in sorted(METRIC_LABELS, key=len, reverse=True):  # macro_f1 before f1
        if base == m or base.endswith("_" + m):
            return m
    return None


def _fmt(value: float | None, metric: str) -> str:
    if value is None or not np.isfinite(value):
        return _NULL
    if metric in _PERCENT:
        return f"{100 * value:.1f}"
    text = f"{value:.3f}"
    return text[1:] if text.startswith("0.") else text


def _cell(name: str, value) -> str:
    if value is None:
        return _NULL
    if name == "selected" and isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            value = ", ".join(f"{k}={v}" for k, v in parsed.items()) or _NULL
    if (metric := _metric_of(name)) is not None and isinstance(value, (int, float)):
        return _fmt(float(value), metric)
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _resolve(names: list[str], columns) -> list[tuple[str, str, str | None]]:
    """(header, column, std column or None) per output column; "x" merges x_mean and x_std into one cell."""
    if columns is None:
        out = []
        for name in names:
            stem = name.removesuffix("_mean")
            if name.endswith("_std") and name.removesuffix("_std") + "_mean" in names:
                continue  # printed with its mean
            if name.endswith("_mean") and stem + "_std" in names:
                out.append((stem, name, stem + "_std"))
            else:
                out.append((name, name, None))
        return out
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    out = []
    for name, header in headers.items():
        if name in names:
            out.append((header, name, None))
        elif name + "_mean" in names:
            out.append((header, name + "_mean", name + "_std" if name + "_std" in names else None))
        else:
            raise ValueError(f"no column {name!r} (nor {name}_mean) in the table; columns: {', '.join(names)}")
    return out


def markdown_table(table: pa.Table, columns: Sequence[str] | Mapping[str, str] | None = None) -> str:
    """A GitHub Markdown table of ``table``; metric columns as "mean ± std" cells, nulls as "—".

    ``columns``: names to show, in order (a mapping gives each a header). A name ``x`` that is not itself a
    column but has ``x_mean`` (and ``x_std``) columns becomes one "mean ± std" cell; ``None`` shows every
    column, merging each ``_mean`` / ``_std`` pair.
    """
    spec = _resolve(table.column_names, columns)
    rows = table.to_pylist()
    lines = ["| " + " | ".join(header.replace("|", "\\|") for header, _, _ in spec) + " |",
             "|" + "|".join("---:" if _metric_of(col) or col == "n_seeds" else "---" for _, col, _ in spec) + "|"]
    for row in rows:
        cells = []
        for _, col, std_col in spec:
            cell = _cell(col, row[col])
            metric = _metric_of(col)
            if std_col is not None and cell != _NULL and metric and _number(row[std_col]) is not None:
                cell += " ± " + _fmt(row[std_col], metric)
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- report


def _no_runs(runs_dir: Path) -> TrainError:
    return TrainError(f"no runs under {runs_dir}: train one with `probecache train --store STORE --probe NAME`")


def _panel_metric(rows: list[dict]) -> tuple[str, str]:
    """(metric, split) one dataset's bar chart shows: the most used selection metric; test if any run has it."""
    used = Counter(r["metric"] for r in rows if r["metric"] in METRIC_LABELS)
    metric = used.most_common(1)[0][0] if used else "f1"
    split = "test" if any(r[f"test_{metric}_mean"] is not None for r in rows) else "validation"
    return metric, split


def _bar_chart(groups: dict[str, list[dict]], path: Path) -> Path:
    probes = sorted({r["probe"] or "?" for rows in groups.values() for r in rows})
    colors = {p: f"C{i % 10}" for i, p in enumerate(probes)}
    widest = max(len(rows) for rows in groups.values())
    fig = Figure(figsize=(min(30.0, max(7.0, 1.1 * widest + 2)), 4.2 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, (dataset, rows) in zip(axes, groups.items(), strict=True):
        metric, split = _panel_metric(rows)
        scale = 100.0 if metric in _PERCENT else 1.0
        means = np.array([np.nan if r[f"{split}_{metric}_mean"] is None else r[f"{split}_{metric}_mean"]
                          for r in rows]) * scale
        stds = np.array([r[f"{split}_{metric}_std"] or 0.0 for r in rows]) * scale
        x = np.arange(len(rows))
        stds = np.where(np.isnan(means), 0.0, stds)
        ax.bar(x, np.nan_to_num(means), width=0.6, yerr=stds, capsize=4, edgecolor="black", linewidth=0.5,
               color=[colors[r["probe"] or "?"] for r in rows])
        for i, (mean, r) in enumerate(zip(means, rows, strict=True)):
            label = _NULL if np.isnan(mean) else _fmt(r[f"{split}_{metric}_mean"], metric)
            ax.annotate(label, (i, np.nan_to_num(mean) + stds[i]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
        ax.set_xlim(-0.6, max(widest, 3) - 0.4)  # same bar width in every panel, and no single full-width bar
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r['probe']}\n{r['run_id']}" for r in rows], rotation=20, ha="right", fontsize=8)
        unit = " (%)" if scale == 100.0 else ""
        ax.set_ylabel(f"{split} {METRIC_LABELS[metric]}{unit}")
        ax.set_ylim(0, 105 if scale == 100.0 else 1.05)
        ax.set_title(f"{dataset}: {split} {METRIC_LABELS[metric]} per run (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
        present = [p for p in probes if any((r["probe"] or "?") == p for r in rows)]
        handles = [Patch(facecolor=colors[p], edgecolor="black", linewidth=0.5, label=p) for p in present]
        ax.legend(handles=handles, title="probe", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


_RUN_COLUMNS = {"run_id": "run", "probe": "probe", "model": "model", "metric": "selection", "n_seeds": "seeds",
                "selected": "hyperparameters"}


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.parquet and report.png (and every run's plots); return them keyed md/parquet/png.

    ``out_dir`` defaults to ``<runs_dir>/report``. Raises TrainError when ``runs_dir`` holds no readable run.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise _no_runs(runs_dir)
    found = _scan(runs_dir)
    if not found:
        raise _no_runs(runs_dir)
    out_dir = runs_dir / "report" if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    table = pa.Table.from_pylist([row for _, row in found], schema=SCHEMA)
    pq.write_table(table, out_dir / "report.parquet")

    groups: dict[str, list[dict]] = {}
    plots: dict[int, list[Path]] = {}  # by id(row): run ids need not be unique across directories
    for run_dir, row in found:
        groups.setdefault(row["dataset"] or "(unknown dataset)", []).append(row)
        try:
            plots[id(row)] = write_run_plots(run_dir)
        except Exception as exc:  # whatever breaks one run's plots must not cost the whole report
            warnings.warn(f"no plots for run {row['run_id']} ({run_dir}): {exc}", stacklevel=2)
            plots[id(row)] = []
    png = _bar_chart(groups, out_dir / "report.png")

    lines = ["# probecache report", "",
             f"{len(found)} run(s) under `{runs_dir}`. Cells are mean ± std over seeds: accuracy, F1 and macro-F1 "
             f"in percent, AUROC and AUPRC as fractions; {_NULL} = not evaluated. Hyperparameters (and a binary "
             "task's threshold) were selected on validation with each run's selection metric.", "",
             f"![selection metric per run]({png.name})", ""]
    for dataset, rows in groups.items():
        sub = pa.Table.from_pylist(rows, schema=SCHEMA)
        stores = sorted({f"`{r['store_id']}` ({r['model']})" for r in rows if r["store_id"]})
        lines += [f"## {dataset}", ""] + ([f"Stores: {', '.join(stores)}.", ""] if stores else [])
        for split in SPLITS:
            lines += [f"### {split.capitalize()}", ""]
            if not any(r[f"{split}_{m}_mean"] is not None for r in rows for m in METRIC_LABELS):
                lines += [f"No run of this dataset was evaluated on the {split} split.", ""]
                continue
            columns = {**_RUN_COLUMNS, **{f"{split}_{m}": label for m, label in METRIC_LABELS.items()}}
            lines += [markdown_table(sub, columns)]
        links = []
        for r in rows:
            made = plots[id(r)]
            if made:
                refs = " · ".join(f"[{p.stem}]({Path(os.path.relpath(p, out_dir)).as_posix()})" for p in made)
                links.append(f"- `{r['run_id']}`: {refs}")
        if links:
            lines += ["### Plots", "", *links, ""]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return {"md": md, "parquet": out_dir / "report.parquet", "png": png}
