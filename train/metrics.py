"""Evaluation metrics for probe predictions (design.md §2: early stopping on validation F1 or accuracy).

numpy only (no scikit-learn). Everything is computed from the labels and the predicted probabilities:

- ``compute_metrics(labels, scores, threshold)``: accuracy, F1, macro-F1, AUROC, AUPRC, confusion matrix.
  Binary task: ``scores`` is (N,), the probability of class 1; an example is predicted positive when
  ``score >= threshold``. Multiclass: ``scores`` is (N, C) class probabilities and the prediction is the
  argmax (ties -> the lowest class index); the threshold does not apply and ``Metrics.threshold`` is None.
  A 2-D ``scores`` is always treated as multiclass, even with C = 2.
- ``tune_threshold(labels, scores, metric)``: the binary decision threshold that maximises F1 or accuracy
  on *validation* data, to be applied unchanged to the test split.
- ``metric_for(label_names)`` / ``DEFAULT_METRIC``: which metric drives early stopping and threshold tuning.

Definitions (all match scikit-learn's, which is not a dependency):

- F1 of one class = 2TP / (2TP + FP + FN), and 0 when that denominator is 0 (no true and no predicted
  members): never NaN, no division warnings. ``f1`` is the positive-class F1 for a binary task and the
  macro-F1 for a multiclass one. ``macro_f1`` is the unweighted mean over *all* C classes (C = 2 for a
  binary task, ``scores.shape[1]`` otherwise), like ``f1_score(average="macro", labels=range(C),
  zero_division=0)``.
- AUROC: the Mann-Whitney U statistic with average ranks for tied scores, U / (P * N); tied
  positive/negative pairs count 1/2. Equals ``roc_auc_score``.
- AUPRC: average precision, sum_k (R_k - R_{k-1}) * P_k over the distinct score values taken as
  thresholds in decreasing order (equal scores form one step), R_0 = 0. Equals
  ``average_precision_score`` (not the trapezoidal area, which is optimistic).
- Multiclass AUROC/AUPRC: one-vs-rest per class (class c's column against ``labels == c``), macro mean.
- AUROC and AUPRC are None when a class is absent from ``labels`` (undefined for the one-class split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# METRICS: what tune_threshold can maximise (and early stopping can monitor); defined in choices.py, which the
# CLI's --help reads without numpy
from .choices import METRICS

__all__ = [
    "DEFAULT_METRIC",
    "METRICS",
    "Metrics",
    "average_precision",
    "compute_metrics",
    "metric_for",
    "roc_auc",
    "select_metric",
    "tune_threshold",
]

DEFAULT_METRIC = {"toxicity": "f1", "safety": "f1", "sentiment": "accuracy", "emotion": "accuracy"}
"""Per task family, the paper's model-selection metric: F1 for safety, accuracy for sentiment."""

_F1_KEYWORDS = ("toxic", "harm", "unsafe")

# Scores may exceed [0, 1] by this much (float rounding in a softmax or sigmoid); more means logits.
_PROB_TOL = 1e-6


@dataclass(frozen=True)
class Metrics:
    """Evaluation of one split. ``to_dict()`` is JSON-serialisable (plain Python numbers and lists)."""

    accuracy: float
    f1: float  # binary: positive-class F1; multiclass: macro-F1
    macro_f1: float
    auroc: float | None  # None when a class is absent from the labels
    auprc: float | None
    confusion: list[list[int]]  # rows = true class, columns = predicted class
    threshold: float | None  # binary decision threshold used; None for multiclass
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- validation


def _labels(labels, n_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels is empty: need at least one example")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("labels must be integer class indices (got non-integral floats)")
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n_classes is not None:
        bad = (arr < 0) | (arr >= n_classes)
        if bad.any():
            raise ValueError(
                f"labels must lie in [0, {n_classes - 1}] for {n_classes} classes; "
                f"got {int(arr[bad][0])} ({int(bad.sum())} label(s) out of range)"
            )
    return arr


def _scores(scores) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"scores must be (N,) for a binary task or (N, C) for multiclass, got shape {arr.shape}")
    if arr.ndim == 2 and arr.shape[1] < 2:
        raise ValueError(f"multiclass scores need C >= 2 columns, got shape {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinite values")
    if arr.size and (arr.min() < -_PROB_TOL or arr.max() > 1 + _PROB_TOL):
        raise ValueError(
            f"scores must be probabilities in [0, 1] (apply sigmoid/softmax to logits first); "
            f"got range [{arr.min():.6g}, {arr.max():.6g}]"
        )
    return arr


def _check_lengths(labels: np.ndarray, scores: np.ndarray) -> None:
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"labels and scores have different lengths: {labels.shape[0]} vs {scores.shape[0]}")


# ---------------------------------------------------------------------------------------------------- ranking


def _grouped_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores ascending, with the number of positives and negatives at each (y is 0/1)."""
    uniq, inv = np.unique(s, return_inverse=True)
    inv = inv.reshape(-1)
    pos = np.bincount(inv, weights=y, minlength=uniq.size).astype(np.int64)
    cnt = np.bincount(inv, minlength=uniq.size).astype(np.int64)
    return uniq, pos, cnt - pos


def roc_auc(y: np.ndarray, s: np.ndarray) -> float | None:
    """AUROC of binary labels ``y`` (0/1) against scores ``s``; None if either class is absent."""
    y = np.asarray(y, dtype=np.int64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, pos, neg = _grouped_counts(y, np.asarray(s, dtype=np.float64))
    cnt = pos + neg
    # Average rank (1-based) of each group of equal scores: ranks before it + (count + 1) / 2.
    before = np.cumsum(cnt) - cnt
    avg_rank = before + (cnt + 1) / 2.0
    rank_sum = float(np.dot(pos, avg_rank))
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(y: np.ndarray, s: np.ndarray) -> float | None:
    """Step-wise average precision of binary labels ``y`` (0/1); None if either class is absent."""
    y = np.asarray(y, dtype=np.int64)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return None
    _, pos, neg = _grouped_counts(y, np.asarray(s, dtype=np.float64))
    # Thresholds in decreasing score order: predicted positive = every example with score >= the threshold.
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    precision = tp / (tp + fp)  # tp + fp >= 1 at every distinct score
    recall = tp / n_pos
    d_recall = np.diff(recall, prepend=0.0)
    return float(np.sum(d_recall * precision))


# ---------------------------------------------------------------------------------------------------- metrics


def _f1_from_counts(tp, fp, fn) -> np.ndarray:
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    out = np.zeros(np.broadcast(tp, denom).shape)
    np.divide(2 * tp, denom, out=out, where=denom > 0)
    return out


def _confusion(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(labels * n_classes + preds, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def compute_metrics(labels, scores, threshold: float = 0.5) -> Metrics:
    """Metrics of one split. ``scores``: (N,) P(class 1) for a binary task, (N, C) probabilities otherwise.

    Binary: predicted positive iff ``score >= threshold``. Multiclass: argmax, ``threshold`` ignored.
    """
    s = _scores(scores)
    n_classes = 2 if s.ndim == 1 else s.shape[1]
    y = _labels(labels, n_classes)
    _check_lengths(y, s)
    n = int(y.size)

    if s.ndim == 1:
        threshold = float(threshold)
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        preds = (s >= threshold).astype(np.int64)
        auroc = roc_auc(y, s)
        auprc = average_precision(y, s)
        used_threshold: float | None = threshold
    else:
        preds = np.argmax(s, axis=1).astype(np.int64)
        aucs, aps = [], []
        for c in range(n_classes):
            yc = (y == c).astype(np.int64)
            aucs.append(roc_auc(yc, s[:, c]))
            aps.append(average_precision(yc, s[:, c]))
        auroc = None if any(a is None for a in aucs) else float(np.mean(aucs))
        auprc = None if any(a is None for a in aps) else float(np.mean(aps))
        used_threshold = None

    cm = _confusion(y, preds, n_classes)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    per_class_f1 = _f1_from_counts(tp, fp, fn)
    macro_f1 = float(per_class_f1.mean())
    f1 = float(per_class_f1[1]) if s.ndim == 1 else macro_f1

    return Metrics(
        accuracy=float(int(tp.sum()) / n),
        f1=f1,
        macro_f1=macro_f1,
        auroc=auroc,
        auprc=auprc,
        confusion=[[int(v) for v in row] for row in cm],
        threshold=used_threshold,
        n=n,
    )


def tune_threshold(labels, scores, metric: str = "f1") -> float:
    """The binary decision threshold maximising ``metric`` ("f1" or "accuracy") on validation data.

    Candidates, with predicted positive iff ``score >= t``: the midpoints between consecutive distinct
    scores, plus the smallest score (everything positive) and the next float above the largest score
    (nothing positive), so every distinct partition of the examples is tried exactly once. Among equally
    good candidates the one closest to 0.5 wins, then the smaller one: the result is deterministic and
    does not depend on the order of the examples.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    s = _scores(scores)
    if s.ndim != 1:
        raise ValueError(f"tune_threshold needs binary scores of shape (N,), got shape {s.shape}")
    y = _labels(labels, 2)
    _check_lengths(y, s)

    uniq, pos, neg = _grouped_counts(y, s)
    mids = uniq[:-1] + (uniq[1:] - uniq[:-1]) / 2.0
    mids = np.where(mids > uniq[:-1], mids, uniq[1:])  # adjacent floats: the midpoint may round down
    candidates = np.concatenate([uniq[:1], mids, [np.nextafter(uniq[-1], np.inf)]])
    # Candidate j predicts positive exactly the groups j, j+1, ... (ascending), so reverse cumulative sums.
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], [0]])
    fp = np.concatenate([np.cumsum(neg[::-1])[::-1], [0]])
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if metric == "f1":
        values = _f1_from_counts(tp, fp, n_pos - tp)  # one exact division each: equal rationals compare equal
    else:
        values = (tp + (n_neg - fp)) / float(y.size)

    best = values == values.max()
    idx = np.flatnonzero(best)
    dist = np.abs(candidates[idx] - 0.5)
    order = np.lexsort((candidates[idx], dist))  # closest to 0.5 first, then the smaller threshold
    return float(candidates[idx[order[0]]])


# ---------------------------------------------------------------------------------------------------- metric choice


def metric_for(label_names: Sequence[str]) -> str:
    """``"f1"`` for safety-like tasks (a class name contains toxic/harm/unsafe), else ``"accuracy"``."""
    if isinstance(label_names, str):
        label_names = [label_names]
    names = [str(name).lower() for name in label_names]
    return "f1" if any(k in name for name in names for k in _F1_KEYWORDS) else "accuracy"


select_metric = metric_for
"""Alias of ``metric_for``."""
