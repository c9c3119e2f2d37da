"""Metrics (train/metrics.py): hand-computed cases, ties, brute-force cross-checks, threshold tuning, validation.

Expected values are worked out by hand in the comments; numpy only, no scikit-learn.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from probecache.train.metrics import (
    DEFAULT_METRIC,
    Metrics,
    average_precision,
    compute_metrics,
    metric_for,
    roc_auc,
    select_metric,
    tune_threshold,
)

# ---------------------------------------------------------------------------------------------------- brute force


def brute_auroc(y, s):
    """P(score_pos > score_neg) + 0.5 * P(tie), over all positive/negative pairs."""
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def brute_ap(y, s):
    """Step-wise AP straight from the definition: sum_k (R_k - R_{k-1}) P_k over distinct thresholds, descending."""
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = np.sum(pred & (y == 1))
        precision = tp / pred.sum()
        recall = tp / np.sum(y == 1)
        total += (recall - prev_recall) * precision
        prev_recall = recall
    return total


# ---------------------------------------------------------------------------------------------------- binary, by hand


def test_binary_hand_computed():
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2])
    m = compute_metrics(y, s)
    # threshold 0.5 -> preds [0, 1, 1, 0, 1, 0]: TP = 2 (0.7, 0.9), FP = 1 (0.6), FN = 1 (0.4), TN = 2 (0.1, 0.2)
    assert m.confusion == [[2, 1], [1, 2]]
    assert m.accuracy == pytest.approx(4 / 6)
    # F1(pos) = 2*2 / (2*2 + 1 + 1) = 2/3; F1(neg) = 2*2 / (2*2 + 1 + 1) = 2/3; macro = 2/3
    assert m.f1 == pytest.approx(2 / 3)
    assert m.macro_f1 == pytest.approx(2 / 3)
    # AUROC: pos {0.7, 0.4, 0.9} vs neg {0.1, 0.6, 0.2}: 0.7 beats 3, 0.4 beats 2, 0.9 beats 3 -> 8/9
    assert m.auroc == pytest.approx(8 / 9)
    # AP: descending 0.9(+) 0.7(+) 0.6(-) 0.4(+) 0.2(-) 0.1(-); recall steps at ranks 1, 2, 4 with
    # precision 1, 1, 3/4 -> 1/3 * 1 + 1/3 * 1 + 1/3 * 3/4 = 11/12
    assert m.auprc == pytest.approx(11 / 12)
    assert m.threshold == 0.5
    assert m.n == 6


def test_threshold_is_inclusive_and_changes_predictions():
    y = np.array([0, 1, 1])
    s = np.array([0.2, 0.5, 0.8])
    assert compute_metrics(y, s, threshold=0.5).confusion == [[1, 0], [0, 2]]  # 0.5 >= 0.5 -> positive
    m = compute_metrics(y, s, threshold=0.6)
    assert m.confusion == [[1, 0], [1, 1]]
    assert m.threshold == 0.6
    # ranking metrics do not depend on the threshold
    assert m.auroc == compute_metrics(y, s, threshold=0.1).auroc == 1.0


def test_ties_hand_computed():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.8, 0.8, 0.3, 0.1])
    # pairs: (0.8+, 0.8-) tie = 1/2, (0.8+, 0.1-) = 1, (0.3+, 0.8-) = 0, (0.3+, 0.1-) = 1 -> 2.5 / 4
    assert roc_auc(y, s) == pytest.approx(0.625)
    # AP: threshold 0.8 takes both tied examples: P = 1/2, R = 1/2; threshold 0.3: P = 2/3, R = 1
    # -> 1/2 * 1/2 + 1/2 * 2/3 = 7/12
    assert average_precision(y, s) == pytest.approx(7 / 12)


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_all_equal_scores(value):
    y = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    s = np.full(y.shape, value)
    m = compute_metrics(y, s)
    assert m.auroc == pytest.approx(0.5)  # every pair tied
    assert m.auprc == pytest.approx(2 / 8)  # one step: R = 1, P = positive rate


def test_perfect_and_inverted():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9])
    perfect = compute_metrics(y, s)
    assert (perfect.auroc, perfect.auprc, perfect.f1, perfect.accuracy) == (1.0, 1.0, 1.0, 1.0)
    inverted = compute_metrics(y, 1 - s)
    assert inverted.auroc == 0.0
    # descending 0.9(-) 0.8(-) 0.2(+) 0.1(+): steps P = 1/3 at R = 1/2, P = 2/4 at R = 1 -> 1/6 + 1/4 = 5/12
    assert inverted.auprc == pytest.approx(5 / 12)
    assert inverted.f1 == 0.0 and inverted.accuracy == 0.0


def test_no_positives_f1_is_zero_without_warnings():
    y = np.zeros(5, dtype=int)
    s = np.array([0.1, 0.2, 0.3, 0.2, 0.1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            m = compute_metrics(y, s)
    # no true and no predicted positives -> F1(pos) = 0 by convention; F1(neg) = 1; macro = 1/2
    assert m.f1 == 0.0
    assert m.macro_f1 == 0.5
    assert m.accuracy == 1.0
    assert m.auroc is None and m.auprc is None  # one class only: undefined
    assert m.confusion == [[5, 0], [0, 0]]


def test_random_scores_auroc_near_half():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20_000)
    s = rng.random(20_000)
    assert abs(compute_metrics(y, s).auroc - 0.5) < 0.02


@pytest.mark.parametrize("seed", range(5))
def test_against_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, 2, n)
    # coarse scores -> many ties; mildly informative so the answers are not all ~0.5
    s = np.clip(np.round(0.3 * y + 0.7 * rng.random(n), 1), 0, 1)
    assert average_precision(y, s) == pytest.approx(brute_ap(y, s), abs=1e-12)
    assert roc_auc(y, s) == pytest.approx(brute_auroc(y, s), abs=1e-12)
    # order of the examples does not matter
    perm = rng.permutation(n)
    assert average_precision(y[perm], s[perm]) == pytest.approx(average_precision(y, s), abs=1e-12)


def test_bool_and_integral_float_labels_accepted():
    s = np.array([0.1, 0.9, 0.6])
    ref = compute_metrics(np.array([0, 1, 1]), s)
    assert compute_metrics(np.array([False, True, True]), s) == ref
    assert compute_metrics(np.array([0.0, 1.0, 1.0]), s) == ref
    assert compute_metrics([0, 1, 1], [0.1, 0.9, 0.6]) == ref


# ---------------------------------------------------------------------------------------------------- multiclass


def test_multiclass_hand_computed():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    preds = [0, 1, 1, 1, 2, 0, 2]
    s = np.full((7, 3), 0.2)
    s[np.arange(7), preds] = 0.6  # argmax = preds; every column takes only the values 0.6 / 0.2
    m = compute_metrics(y, s)
    # rows = true class: class 0 -> preds 0, 1; class 1 -> 1, 1; class 2 -> 2, 0, 2
    assert m.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert m.accuracy == pytest.approx(5 / 7)
    # F1: class 0 TP 1 FP 1 FN 1 -> 2/4; class 1 TP 2 FP 1 FN 0 -> 4/5; class 2 TP 2 FP 0 FN 1 -> 4/5
    assert m.macro_f1 == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert m.f1 == m.macro_f1
    assert m.threshold is None
    assert m.n == 7
    # OvR AUROC. class 0: pos {0.6, 0.2} vs neg {0.2 x4, 0.6}: 0.6 -> 4 + 1/2, 0.2 -> 4 * 1/2 = 2: 6.5/10
    # class 1: pos {0.6, 0.6} vs neg {0.2 x4, 0.6}: each 4 + 1/2 -> 9/10
    # class 2: pos {0.6, 0.2, 0.6} vs neg {0.2 x4}: 4 + 2 + 4 -> 10/12
    assert m.auroc == pytest.approx((13 / 20 + 9 / 10 + 5 / 6) / 3)
    # OvR AP. class 0: at 0.6 {+,-}: P 1/2 R 1/2; at 0.2: P 2/7 R 1 -> 1/4 + 1/7 = 11/28
    # class 1: at 0.6 {-,+,+}: P 2/3 R 1 -> 2/3
    # class 2: at 0.6 {+,+}: P 1 R 2/3; at 0.2: P 3/7 R 1 -> 2/3 + 1/7 = 17/21
    assert m.auprc == pytest.approx((11 / 28 + 2 / 3 + 17 / 21) / 3)


def test_multiclass_matches_one_vs_rest_brute_force():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[y]
    s = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = compute_metrics(y, s)
    assert m.auroc == pytest.approx(np.mean([brute_auroc((y == c).astype(int), s[:, c]) for c in range(4)]))
    assert m.auprc == pytest.approx(np.mean([brute_ap((y == c).astype(int), s[:, c]) for c in range(4)]))
    assert m.accuracy == pytest.approx(np.mean(np.argmax(s, 1) == y))
    assert sum(map(sum, m.confusion)) == 200


def test_multiclass_missing_class_gives_none():
    y = np.array([0, 1, 0, 1])  # class 2 never occurs
    s = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    m = compute_metrics(y, s)
    assert m.auroc is None and m.auprc is None
    # preds 0, 1, 0, 2: class 0 F1 1, class 1 TP 1 FN 1 -> 2/3, class 2 TP 0 FP 1 -> 0
    assert m.macro_f1 == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m.confusion == [[2, 0, 0], [0, 1, 1], [0, 0, 0]]


def test_binary_missing_class_gives_none():
    m = compute_metrics(np.ones(3, dtype=int), np.array([0.2, 0.7, 0.9]))
    assert m.auroc is None and m.auprc is None
    # TP 2 FN 1 -> F1 4/5
    assert m.f1 == pytest.approx(0.8)


def test_to_dict_is_json_serialisable():
    m = compute_metrics(np.array([0, 1, 1, 0]), np.array([0.3, 0.8, 0.4, 0.1]))
    d = m.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"accuracy", "f1", "macro_f1", "auroc", "auprc", "confusion", "threshold", "n"}
    assert all(type(v) is int for row in d["confusion"] for v in row)
    assert type(d["n"]) is int and type(d["accuracy"]) is float
    none = compute_metrics(np.array([0, 1]), np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])).to_dict()
    assert json.loads(json.dumps(none)) == none and none["auroc"] is None and none["threshold"] is None
    with pytest.raises(AttributeError):
        m.accuracy = 0.0  # frozen
    assert isinstance(m, Metrics)


# ---------------------------------------------------------------------------------------------------- threshold tuning


def test_tune_threshold_planted_and_tie_break():
    # ascending: 0.1- 0.2- 0.3- 0.35+ 0.4- 0.9+
    y = np.array([0, 0, 0, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.9])
    # t = 0.325 -> positives {0.35, 0.4, 0.9}: TP 2 FP 1 FN 0, F1 4/5 (best), accuracy 5/6
    # t = 0.375 -> {0.4, 0.9}: F1 2/4, accuracy 4/6;  t = 0.65 -> {0.9}: F1 2/3, accuracy 5/6
    # t = 0.25  -> {0.3, 0.35, 0.4, 0.9}: F1 4/6, accuracy 4/6; all negative: accuracy 4/6
    assert tune_threshold(y, s, "f1") == pytest.approx(0.325)
    # accuracy ties at 5/6 between 0.325 and 0.65: 0.65 is closer to 0.5
    assert tune_threshold(y, s, "accuracy") == pytest.approx(0.65)


def test_tune_threshold_separable_prefers_point_nearest_half():
    y = np.array([0, 0, 0, 1, 1, 1])
    # only t in (0.15, 0.2] separates; candidate = the midpoint 0.175
    assert tune_threshold(y, np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.3])) == pytest.approx(0.175)
    # with a wide gap, the midpoint 0.5 itself
    assert tune_threshold(y, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])) == pytest.approx(0.5)


def test_tune_threshold_extremes():
    # every example positive: best F1 predicts all positive -> threshold = smallest score
    assert tune_threshold(np.ones(3, dtype=int), np.array([0.2, 0.6, 0.9]), "f1") == pytest.approx(0.2)
    # every example negative: best accuracy predicts nothing positive -> just above the largest score
    t = tune_threshold(np.zeros(3, dtype=int), np.array([0.2, 0.3, 1.0]), "accuracy")
    assert t > 1.0 and compute_metrics(np.zeros(3, dtype=int), np.array([0.2, 0.3, 1.0]), t).accuracy == 1.0


@pytest.mark.parametrize("metric", ["f1", "accuracy"])
def test_tune_threshold_is_optimal_and_deterministic(metric):
    rng = np.random.default_rng(7)
    n = 400
    y = (rng.random(n) < 0.2).astype(int)  # rare positives
    s = np.clip(np.round(0.35 * y + 0.65 * rng.random(n), 2), 0, 1)  # ties
    t = tune_threshold(y, s, metric)
    best = getattr(compute_metrics(y, s, t), metric)
    # no other threshold (every distinct score and midpoint, plus a fine grid) does better
    u = np.unique(s)
    others = np.concatenate([u, (u[1:] + u[:-1]) / 2, np.linspace(0, 1, 1001)])
    assert all(getattr(compute_metrics(y, s, o), metric) <= best for o in others)
    # deterministic and independent of example order
    perm = rng.permutation(n)
    assert tune_threshold(y, s, metric) == t
    assert tune_threshold(y[perm], s[perm], metric) == t


# ---------------------------------------------------------------------------------------------------- metric choice


def test_metric_for():
    assert metric_for(["non-toxic", "toxic"]) == "f1"
    assert metric_for(["safe", "UNSAFE"]) == "f1"
    assert metric_for(["benign", "harmful"]) == "f1"
    assert metric_for(["negative", "positive"]) == "accuracy"
    assert metric_for(["sadness", "joy", "love", "anger", "fear", "surprise"]) == "accuracy"
    assert select_metric is metric_for
    assert DEFAULT_METRIC["toxicity"] == "f1" and DEFAULT_METRIC["sentiment"] == "accuracy"


# ---------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([0, 1, 1], [0.1, 0.9], "different lengths: 3 vs 2"),
        ([0, 2, 1], [0.1, 0.9, 0.5], r"labels must lie in \[0, 1\] for 2 classes; got 2"),
        ([0, -1, 1], [0.1, 0.9, 0.5], r"got -1"),
        ([0, 3], [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], r"labels must lie in \[0, 2\] for 3 classes; got 3"),
        ([0, 1], [[0.5, 0.3, 0.2]], "different lengths: 2 vs 1"),
        ([0.5, 1.0], [0.1, 0.9], "integer class indices"),
        (["a", "b"], [0.1, 0.9], "integer class indices"),
        ([[0, 1]], [0.1, 0.9], "1-D array"),
        ([], [], "empty"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1], [-2.3, 1.7], r"probabilities in \[0, 1\]"),
        ([0, 1], [[0.5], [0.5]], "C >= 2"),
        ([0, 1], np.zeros((2, 2, 2)), "scores must be"),
    ],
)
def test_invalid_inputs_raise(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(np.asarray(labels), np.asarray(scores, dtype=float))


def test_invalid_threshold_and_metric():
    with pytest.raises(ValueError, match="threshold must be finite"):
        compute_metrics([0, 1], [0.2, 0.8], threshold=float("nan"))
    with pytest.raises(ValueError, match="metric must be one of"):
        tune_threshold([0, 1], [0.2, 0.8], metric="auroc")
    with pytest.raises(ValueError, match=r"binary scores of shape \(N,\)"):
        tune_threshold([0, 1], [[0.2, 0.8], [0.6, 0.4]])
    with pytest.raises(ValueError, match="different lengths"):
        tune_threshold([0, 1, 0], [0.2, 0.8])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        tune_threshold([0, 2], [0.2, 0.8])
