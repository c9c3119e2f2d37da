"""Figures of one training run (design.md §2): layer attention, per-layer linear curve, PR / ROC.

- :func:`plot_layer_weights`: the paper's layer-attention figure. The scoring probe's stage-2 weight on each
  layer, one line per true class, from ``layer_weights.parquet``.
- :func:`plot_layer_curve`: the per-layer linear probe's validation metrics against the layer, from
  ``layer_curve.parquet``; the selection metric drawn bold, AUROC dashed, the layer chosen on validation marked.
- :func:`plot_pr_roc`: precision-recall and ROC curves side by side; one curve for a binary task (``scores``
  of shape (N,), P(class 1)), one-vs-rest per class for a multiclass one (``scores`` of shape (N, C)).
- :func:`write_run_plots`: whichever of the three a run directory has the inputs for, as
  ``<run_dir>/plots/{layer_weights,layer_curve,pr_roc}.png``.

Decisions:

- ``matplotlib.figure.Figure`` objects, never ``pyplot``: no global figure registry to leak into or close,
  no backend switch that would affect a caller's own plots; ``savefig`` renders PNG with Agg. A figure
  is unreachable (and freed) once its function returns.
- Layer 0 is the embedding output (the store's layer index), labelled "emb" on every layer axis.
- The PR curve is drawn as the step function that average precision integrates (precision P_k held over
  the recall interval (R_{k-1}, R_k], equal scores forming one step), and the legend values come from
  :mod:`.metrics`, so the figure agrees with ``metrics.json`` exactly. ROC is piecewise linear through
  the same distinct thresholds (ties give one diagonal segment, as in the Mann-Whitney AUROC).
- A class absent from the labels has no PR / ROC curve (both undefined); the legend says so instead.
- ``write_run_plots`` treats a missing optional file, or one with no rows to draw, as "no plot"; a file
  that exists but is malformed raises, naming it. The report (:mod:`.report`) catches that per run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib import colormaps
from matplotlib.figure import Figure

from .errors import TrainError
from .metrics import average_precision, roc_auc

__all__ = ["METRIC_LABELS", "plot_layer_curve", "plot_layer_weights", "plot_pr_roc", "write_run_plots"]

METRIC_LABELS = {"accuracy": "Accuracy", "f1": "F1", "macro_f1": "Macro-F1", "auroc": "AUROC", "auprc": "AUPRC"}
"""Every metric a run reports, in display order, with its label on figures and in tables."""

DPI = 120
_MAX_LAYER_TICKS = 33  # beyond this many layers, label every k-th tick so the labels stay legible


# ---------------------------------------------------------------------------------------------------- helpers


def _column(table, name: str, dtype=np.float64) -> np.ndarray:
    """One column of a pyarrow Table or a mapping of columns (dict, DataFrame); nulls become NaN for floats."""
    if isinstance(table, pa.Table):
        if name not in table.column_names:
            raise ValueError(f"table has no column {name!r} (columns: {', '.join(table.column_names)})")
        values = table.column(name).to_pylist()
    else:
        if name not in table:
            raise ValueError(f"table has no column {name!r} (columns: {', '.join(map(str, table))})")
        values = list(table[name])
    try:
        return np.asarray(values, dtype=dtype)  # None -> nan for float dtypes
    except (TypeError, ValueError) as exc:  # a null in an integer column, a string among numbers
        raise ValueError(f"column {name!r} cannot be read as {np.dtype(dtype).name}: {exc}") from exc


def _has_column(table, name: str) -> bool:
    return name in (table.column_names if isinstance(table, pa.Table) else table)


def _layer_ticks(ax, layers: np.ndarray) -> None:
    layers = np.unique(layers.astype(np.int64))
    step = max(1, math.ceil(layers.size / _MAX_LAYER_TICKS))
    ticks = layers[::step]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["emb" if t == 0 else str(t) for t in ticks], fontsize=8 if ticks.size > 16 else 10)
    ax.set_xlabel("layer (emb = embedding output)")


def _class_name(class_names: Sequence[str] | None, c: int) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return str(class_names[c])
    return f"class {c}"


def _fmt3(value: float | None) -> str:
    """.898 style (no leading zero), as in the report tables."""
    if value is None or not np.isfinite(value):
        return "n/a"
    text = f"{value:.3f}"
    return text[1:] if text.startswith("0") else text


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


# ---------------------------------------------------------------------------------------------------- layer weights


def plot_layer_weights(table, class_names: Sequence[str] | None, path: str | Path, title: str | None = None) -> Path:
    """Stage-2 attention weight per layer, one line per true class; columns ``class``, ``layer``, ``weight``.

    The dotted line is the uniform weight 1/L1: where the scoring gates start (plain mean pooling), so a
    layer above it is one the probe learned to up-weight.
    """
    classes = _column(table, "class", np.int64)
    layers = _column(table, "layer", np.int64)
    weights = _column(table, "weight")
    if classes.size == 0:
        raise ValueError("layer weight table is empty: nothing to plot")
    pairs = classes * (layers.max() + 1) + layers
    if np.unique(pairs).size != pairs.size:
        raise ValueError("layer weight table has more than one row for some (class, layer) pair")

    all_layers = np.unique(layers)
    fig = Figure(figsize=(max(6.0, min(14.0, 0.3 * all_layers.size + 4)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    for c in np.unique(classes):
        rows = classes == c
        order = np.argsort(layers[rows])
        ax.plot(layers[rows][order], weights[rows][order], marker="o", markersize=4, linewidth=1.8,
                label=_class_name(class_names, int(c)))
    ax.axhline(1.0 / all_layers.size, color="0.5", linestyle=":", linewidth=1.2,
               label=f"uniform (1/{all_layers.size})")
    _layer_ticks(ax, all_layers)
    ax.set_ylabel("mean stage-2 attention weight")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Scoring probe: attention over layers, by true class")
    ax.grid(alpha=0.3)
    ax.legend(title="true class", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- layer curve


def plot_layer_curve(table, metric: str, path: str | Path, title: str | None = None) -> Path:
    """Validation metrics of the per-layer linear probe against the layer; ``metric`` (the selection one) bold.

    Columns: ``layer``, any of the metrics in ``METRIC_LABELS`` (null -> gap), optional ``selected`` (bool).
    """
    if metric not in METRIC_LABELS:
        raise ValueError(f"metric must be one of {', '.join(METRIC_LABELS)}, got {metric!r}")
    if not _has_column(table, metric):
        raise ValueError(f"layer curve table has no column {metric!r} for the selection metric")
    layers = _column(table, "layer", np.int64)
    if layers.size == 0:
        raise ValueError("layer curve table is empty: nothing to plot")
    order = np.argsort(layers)
    layers = layers[order]

    fig = Figure(figsize=(max(6.5, min(14.0, 0.3 * layers.size + 4)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, label in METRIC_LABELS.items():
        if not _has_column(table, name):
            continue
        values = _column(table, name)[order]
        if np.all(np.isnan(values)):
            continue  # e.g. AUROC of a split with one class: nothing to draw
        if name == metric:
            style = {"linewidth": 2.8, "marker": "o", "markersize": 4, "zorder": 3}
            label = f"{label} (selection)"
        elif name == "auroc":
            style = {"linewidth": 1.5, "linestyle": "--"}
        else:
            style = {"linewidth": 1.2, "alpha": 0.75}
        ax.plot(layers, values, label=label, **style)

    if _has_column(table, "selected"):
        selected = _column(table, "selected", object)[order]
        primary = _column(table, metric)[order]
        for i in np.flatnonzero(selected == True):  # noqa: E712 - object array of bool / None
            layer = int(layers[i])
            ax.axvline(layer, color="0.35", linestyle=":", linewidth=1.2)
            ax.plot([layer], [primary[i]], marker="*", markersize=16, color="crimson", zorder=4,
                    label=f"selected: {'emb' if layer == 0 else f'layer {layer}'} "
                          f"({METRIC_LABELS[metric]} {_fmt3(primary[i])})")
    _layer_ticks(ax, layers)
    ax.set_ylabel("validation metric")
    ax.set_title(title or "Linear probe per layer (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- PR / ROC


def _curves(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, fpr, tpr) over the distinct scores taken as thresholds in decreasing order."""
    uniq, inv = np.unique(s, return_inverse=True)
    pos = np.bincount(inv.reshape(-1), weights=y, minlength=uniq.size)[::-1]
    cnt = np.bincount(inv.reshape(-1), minlength=uniq.size)[::-1]
    tp = np.cumsum(pos)
    fp = np.cumsum(cnt - pos)
    n_pos, n_neg = tp[-1], fp[-1]
    recall = tp / n_pos
    precision = tp / (tp + fp)
    fpr = np.concatenate([[0.0], fp / n_neg])
    tpr = np.concatenate([[0.0], tp / n_pos])
    return recall, precision, fpr, tpr


def plot_pr_roc(labels, scores, class_names: Sequence[str] | None, path: str | Path,
                title: str | None = None) -> Path:
    """PR (left) and ROC (right). ``scores``: (N,) P(class 1), or (N, C) probabilities (one-vs-rest per class)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if s.ndim not in (1, 2) or s.shape[0] != y.size:
        raise ValueError(f"scores must be (N,) or (N, C) with N = {y.size} labels, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    y = y.astype(np.int64)

    # (name, binary labels, scores) per curve: the positive class for a binary task, every class otherwise.
    if s.ndim == 1:
        curves = [(_class_name(class_names, 1), (y == 1).astype(np.int64), s)]
    else:
        curves = [(_class_name(class_names, c), (y == c).astype(np.int64), s[:, c]) for c in range(s.shape[1])]
    binary = s.ndim == 1

    fig = Figure(figsize=(11.0, 4.6), layout="constrained")
    ax_pr, ax_roc = fig.subplots(1, 2)
    palette = colormaps["tab20"] if len(curves) > 10 else None  # the default cycle repeats after 10 colours
    for k, (name, yc, sc) in enumerate(curves):
        color = palette(k % 20) if palette else f"C{k}"
        ap, auc = average_precision(yc, sc), roc_auc(yc, sc)
        if ap is None:  # the class (or its complement) is absent: both curves undefined
            ax_pr.plot([], [], color=color, label=f"{name}: undefined (one class only)")
            ax_roc.plot([], [], color=color, label=f"{name}: undefined (one class only)")
            continue
        recall, precision, fpr, tpr = _curves(yc, sc)
        pr_label = f"AUPRC {_fmt3(ap)}" if binary else f"{name} (AP {_fmt3(ap)})"
        roc_label = f"AUROC {_fmt3(auc)}" if binary else f"{name} (AUC {_fmt3(auc)})"
        ax_pr.plot(np.concatenate([[0.0], recall]), np.concatenate([[precision[0]], precision]),
                   drawstyle="steps-pre", color=color, linewidth=1.8, label=pr_label)
        ax_roc.plot(fpr, tpr, color=color, linewidth=1.8, label=roc_label)
        if binary:
            prevalence = yc.mean()
            ax_pr.axhline(prevalence, color="0.5", linestyle=":", linewidth=1.2,
                          label=f"chance (prevalence {_fmt3(prevalence)})")
    ax_roc.plot([0, 1], [0, 1], color="0.5", linestyle=":", linewidth=1.2, label="chance")

    positive = f" ({_class_name(class_names, 1)} = positive)" if binary else " (one-vs-rest)"
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall" + positive)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02),
               title="ROC" + positive)
    many = len(curves) > 8  # e.g. 28 emotion classes: two small legend columns rather than one off the axes
    for ax in (ax_pr, ax_roc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if many else 9, ncol=2 if many else 1, loc="lower left" if ax is ax_pr else "lower right")
    fig.suptitle(title or f"PR and ROC curves (n = {y.size})")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- run directory


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``, or {} when it is missing or unreadable: it only supplies titles and names."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _score_columns(table: pa.Table) -> list[str]:
    """``score`` for a binary run, else ``score_0 .. score_{C-1}`` in class order (score_10 after score_9)."""
    if "score" in table.column_names:
        return ["score"]
    numbered = [(int(m.group(1)), name) for name in table.column_names if (m := re.fullmatch(r"score_(\d+)", name))]
    if not numbered:
        raise TrainError("scores.parquet has neither a 'score' column nor 'score_0'.. columns")
    numbered.sort()
    if [c for c, _ in numbered] != list(range(len(numbered))):
        raise TrainError(f"scores.parquet score columns are not score_0..score_{len(numbered) - 1}")
    return [name for _, name in numbered]


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """Write the plots a run directory has inputs for into ``<run_dir>/plots/``; return the written paths.

    ``layer_weights.png`` from layer_weights.parquet, ``layer_curve.png`` from layer_curve.parquet,
    ``pr_roc.png`` from the test rows of scores.parquet (the validation rows when there are none). A
    missing file, or one with no rows, is skipped; a malformed one raises TrainError naming it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config = _read_json(run_dir / "config.json")
    store = config.get("store") if isinstance(config.get("store"), dict) else {}
    class_names = store.get("label_names")
    run_id = config.get("run_id") or run_dir.name
    what = " / ".join(str(v) for v in (config.get("probe"), store.get("dataset")) if v)
    suffix = f"\n{run_id}" + (f" ({what})" if what else "")
    out = run_dir / "plots"
    written: list[Path] = []

    def read(name: str) -> pa.Table | None:
        path = run_dir / name
        if not path.is_file():
            return None
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise TrainError(f"cannot read {path}: {exc}") from exc
        return table if table.num_rows else None

    def guarded(name: str, fn, *args, **kw) -> None:
        try:
            written.append(fn(*args, **kw))
        except ValueError as exc:  # the plot's own checks of what the file holds (shapes, NaN, columns)
            raise TrainError(f"{run_dir / name}: {exc}") from exc

    if (table := read("layer_weights.parquet")) is not None:
        guarded("layer_weights.parquet", plot_layer_weights, table, class_names, out / "layer_weights.png",
                title="Scoring probe: attention over layers, by true class" + suffix)

    if (table := read("layer_curve.parquet")) is not None:
        metric = config.get("metric") or _read_json(run_dir / "metrics.json").get("metric") or "f1"
        guarded("layer_curve.parquet", plot_layer_curve, table, metric, out / "layer_curve.png",
                title="Linear probe per layer (validation)" + suffix)

    if (table := read("scores.parquet")) is not None:
        splits = table.column("split").to_pylist() if "split" in table.column_names else []
        split = "test" if "test" in splits else "validation" if "validation" in splits else None
        if split is not None:
            rows = table.filter(pa.array([s == split for s in splits]))
            try:
                cols = _score_columns(rows)
            except TrainError as exc:
                raise TrainError(f"{run_dir / 'scores.parquet'}: {exc}") from exc
            scores = np.stack([_column(rows, c) for c in cols], axis=1)
            scores = scores[:, 0] if cols == ["score"] else scores
            guarded("scores.parquet", plot_pr_roc, _column(rows, "label", np.int64), scores, class_names,
                    out / "pr_roc.png", title=f"PR and ROC, {split} split (n = {rows.num_rows})" + suffix)
    return written
