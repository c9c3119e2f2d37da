"""The streaming trainer (train/trainer.py) and the data it reads (train/data.py).

Synthetic batch sources where the test needs exact control (early stopping, losses); otherwise small real
stores built once per module with the extractor on the tiny random Llama (L+1 = 4 layers, d = 64): 60 reviews
whose label is carried by one word ("great"-like vs "awful"-like), train 40 / validation 10 / test 10 in shards
of 8, fp32 (so pooled and token-level reads agree to float rounding).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from probecache.train import trainer as trainer_module
from probecache.train.data import (
    PooledBatches,
    SplitSpec,
    TokenBatches,
    batch_source,
    carve,
    resolve_splits,
    split_examples,
)
from probecache.train.errors import TrainError
from probecache.train.loaders import Batch
from probecache.train.probes import ProbeConfig, build_probe
from probecache.train.trainer import TrainConfig, Variant, evaluate, fit_shared, predict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def extract_fp32(extract_tiny_store, tiny_model, sentiment_csv, tmp_path_factory):
    def extract(folder: str, **overrides):
        root = tmp_path_factory.mktemp(folder)
        return extract_tiny_store(tiny_model, root, sentiment_csv, dtype="fp32", **overrides)

    return extract


@pytest.fixture(scope="module")
def store(extract_fp32):
    return extract_fp32("trainer-store")


@pytest.fixture(scope="module")
def carve_store(extract_fp32):
    """The same data without a validation split (the extractor is told to keep train and test only)."""
    return extract_fp32("trainer-carve", splits=("train", "test"))


# ---- synthetic batch sources -----------------------------------------------------------------------------


class ArraySource:
    """A batch source over in-memory tensors: hidden (N, L, T, d), all tokens valid; optional seeded shuffle."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.ids = [f"s{i}" for i in range(len(y))]

    @property
    def n_batches(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def epoch(self, epoch: int):
        n = len(self.y)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        for start in range(0, n, self.batch_size):
            idx = torch.from_numpy(order[start : start + self.batch_size])
            x = self.x[idx]
            yield Batch(hidden=x, mask=torch.ones(x.shape[0], x.shape[2], dtype=torch.bool), y=self.y[idx],
                        example_ids=[self.ids[i] for i in idx.tolist()])


def separable(n: int, seed: int, n_layers: int = 2, tokens: int = 3, d: int = 8, positive_share: float = 0.5,
              margin: float = 3.0):
    """Labels carried by feature 0 of every token (+margin / -margin), small noise elsewhere: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < positive_share).long()
    y[0], y[1] = 0, 1  # both classes always present
    x = 0.1 * torch.randn(n, n_layers, tokens, d, generator=g)
    x[..., 0] += (2 * y.float() - 1)[:, None, None] * margin
    return x, y


def variant(name: str = "pooling", n_layers: int = 2, d: int = 8, n_classes: int = 2, pool: str = "mean",
            downcast: int = 2, heads: int = 2, **train) -> Variant:
    return Variant(ProbeConfig(name, n_layers, d, n_classes, pool=pool, downcast=downcast, heads=heads),
                   TrainConfig(**train))


def state(probe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in probe.state_dict().items()}


def assert_same_state(a, b, exact: bool = True) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


# ---- TrainConfig -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,option", [
    ("lr", 0.0, "--lr"), ("lr", -1e-3, "--lr"), ("lr", math.nan, "--lr"),
    ("weight_decay", -0.1, "--weight-decay"),
    ("batch_size", 0, "--batch-size"), ("epochs", 0, "--epochs"), ("patience", 0, "--patience"),
    ("class_weight", "inverse", "--class-weight"),
])
def test_train_config_rejects_bad_values_naming_the_option(field, value, option):
    with pytest.raises(TrainError, match=re.escape(option)):
        TrainConfig(**{field: value})


def test_train_config_defaults_are_valid_and_hashable():
    config = TrainConfig()
    assert (config.lr, config.weight_decay, config.class_weight) == (1e-3, 0.01, "none")
    assert TrainConfig(weight_decay=0.0, class_weight="balanced") != config
    assert len({variant(), variant()}) == 1  # variants are dictionary keys in the sweep


def test_fit_shared_needs_a_variant():
    x, y = separable(8, seed=0)
    src = ArraySource(x, y, 4, shuffle=False)
    with pytest.raises(ValueError, match="no variants"):
        fit_shared([], src, src, "f1", np.bincount(y.numpy()), progress=False)


# ---- early stopping and the kept epoch -------------------------------------------------------------------


def test_early_stopping_keeps_the_best_epoch(monkeypatch):
    """Validation saturates at once; patience 1 and 2 stop early, and the probe returned is the best epoch's."""
    x_tr, y_tr = separable(48, seed=0)
    x_val, y_val = separable(16, seed=1)
    train, val = ArraySource(x_tr, y_tr, 8, shuffle=True), ArraySource(x_val, y_val, 8, shuffle=False)
    calls: list[list[np.ndarray]] = []  # per validation read (one per epoch): each active variant's scores
    real_predict = trainer_module.predict

    def recording_predict(probes, batches, *args, **kwargs):
        pred = real_predict(probes, batches, *args, **kwargs)
        calls.append([s.copy() for s in pred.scores])
        return pred

    monkeypatch.setattr(trainer_module, "predict", recording_predict)
    variants = [variant(lr=0.1, epochs=12, patience=1), variant(lr=0.1, epochs=12, patience=2, seed=1)]
    results = fit_shared(variants, train, val, "f1", np.bincount(y_tr.numpy()), progress=False)
    monkeypatch.undo()

    for index, (v, r) in enumerate(zip(variants, results, strict=True)):
        values = [h["validation_f1"] for h in r.history]
        assert [h["epoch"] for h in r.history] == list(range(len(r.history)))
        assert r.best_epoch == int(np.argmax(values))  # the first epoch with the best value
        assert len(r.history) == r.best_epoch + 1 + v.train.patience < v.train.epochs  # stopped early
        assert all(val <= values[r.best_epoch] for val in values[r.best_epoch + 1 :])
        # the validation metrics and scores reported are those of the weights returned ...
        rescored = predict([r.probe], val.epoch(0)).scores[0]
        np.testing.assert_array_equal(rescored, r.validation_scores[2])
        assert evaluate(y_val.numpy(), rescored, r.threshold) == r.validation
        assert r.validation["f1"] == values[r.best_epoch] and r.threshold == r.validation["threshold"]
        # ... which are the best epoch's, not the last one's (this variant was active in the first len(history)
        # validation reads, at position `index` while both were active)
        per_epoch = [calls[e][index if len(calls[e]) == 2 else 0] for e in range(len(r.history))]
        np.testing.assert_array_equal(rescored, per_epoch[r.best_epoch])
        assert not np.array_equal(rescored, per_epoch[-1])
        assert r.probe.training is False
    # the patience-1 variant stopped first; the shared pass went on for the other one alone
    assert len(results[0].history) < len(results[1].history) == len(calls)
    assert [len(c) for c in calls] == [2] * len(results[0].history) + [1] * (len(calls) - len(results[0].history))


def test_a_diverged_probe_is_the_users_error_naming_the_fix():
    """Training data with an infinite state makes the probe's validation scores NaN: a TrainError that names --lr
    and the store, not compute_metrics' ValueError about its arguments (which the CLI would show as a bug)."""
    x_tr, y_tr = separable(16, seed=0)
    x_tr[3, 0, 0, 0] = math.inf
    x_val, y_val = separable(8, seed=1)
    train, val = ArraySource(x_tr, y_tr, 8, shuffle=False), ArraySource(x_val, y_val, 8, shuffle=False)
    with pytest.raises(TrainError, match=r"NaN or infinite values on validation after epoch 1: .*lower --lr"):
        fit_shared([variant(lr=0.1, epochs=2)], train, val, "f1", np.bincount(y_tr.numpy()), progress=False)


def test_without_improvement_stops_at_epochs_and_cosine_reaches_zero():
    x_tr, y_tr = separable(24, seed=2)
    x_val, y_val = separable(8, seed=3)
    src, val = ArraySource(x_tr, y_tr, 8, shuffle=True), ArraySource(x_val, y_val, 8, shuffle=False)
    (r,) = fit_shared([variant(lr=0.05, epochs=3, patience=5)], src, val, "accuracy", np.bincount(y_tr.numpy()),
                      progress=False)
    assert len(r.history) == 3 and 0 <= r.best_epoch < 3
    steps = 3 * src.n_batches
    for h in r.history:  # cosine decay from lr to 0 over epochs x batches steps, no warmup
        done = (h["epoch"] + 1) * src.n_batches
        assert h["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * done / steps)), abs=1e-12)
    assert r.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert set(r.history[0]) == {"epoch", "train_loss", "validation_accuracy", "lr"}


# ---- determinism and the shared pass ----------------------------------------------------------------------


def _token_sources(store, batch_size: int = 8, seed: int = 0):
    splits = resolve_splits(store)
    return (TokenBatches(store, splits.train, None, batch_size, shuffle=True, seed=seed),
            TokenBatches(store, splits.validation, None, batch_size, shuffle=False))


def _counts(store) -> np.ndarray:
    return np.bincount(split_examples(store, resolve_splits(store).train)[1], minlength=2)


def test_same_seed_same_result_and_seeds_change_the_init(store):
    def fit(seed: int):
        train, val = _token_sources(store)
        v = Variant(ProbeConfig("scoring", 4, 64), TrainConfig(lr=3e-2, batch_size=8, epochs=2, seed=seed))
        return fit_shared([v], train, val, "accuracy", _counts(store), progress=False)[0]

    a, b, c = fit(0), fit(0), fit(1)
    assert_same_state(a.probe, b.probe)
    assert a.validation == b.validation and a.threshold == b.threshold and a.best_epoch == b.best_epoch
    assert a.history == b.history
    np.testing.assert_array_equal(a.validation_scores[2], b.validation_scores[2])
    assert not torch.equal(a.probe.head.weight, c.probe.head.weight)
    # the seed fixes the initialisation: the head of a fresh probe built under each seed differs
    torch.manual_seed(0)
    init0 = build_probe(ProbeConfig("scoring", 4, 64)).head.weight.detach().clone()
    torch.manual_seed(1)
    init1 = build_probe(ProbeConfig("scoring", 4, 64)).head.weight.detach().clone()
    assert not torch.equal(init0, init1)


def test_shared_pass_equals_training_each_variant_alone(store):
    variants = [
        Variant(ProbeConfig("scoring", 4, 64), TrainConfig(lr=3e-2, batch_size=8, epochs=3, patience=1, seed=0)),
        Variant(ProbeConfig("scoring", 4, 64), TrainConfig(lr=1e-2, batch_size=8, epochs=2, seed=1,
                                                             class_weight="balanced")),
        Variant(ProbeConfig("mha", 4, 64, downcast=8, heads=2), TrainConfig(lr=1e-2, batch_size=8, epochs=2)),
        Variant(ProbeConfig("pooling", 4, 64, pool="max"), TrainConfig(lr=5e-2, batch_size=8, epochs=3)),
    ]
    shared = fit_shared(variants, *_token_sources(store), "accuracy", _counts(store), progress=False)
    assert [r.variant for r in shared] == variants
    for v, together in zip(variants, shared, strict=True):
        (alone,) = fit_shared([v], *_token_sources(store), "accuracy", _counts(store), progress=False)
        assert_same_state(together.probe, alone.probe, exact=False)
        assert together.best_epoch == alone.best_epoch and len(together.history) == len(alone.history)
        assert together.validation == alone.validation
        for h1, h2 in zip(together.history, alone.history, strict=True):
            assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-6)


# ---- class weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [2, 3])
def test_balanced_class_weight_is_in_the_loss(n_classes):
    """One batch, one epoch: the epoch's train_loss is the loss of the initial probe, with or without weights."""
    g = torch.Generator().manual_seed(5)
    y = torch.tensor([0] * 9 + [1] * 3 + ([2] * 6 if n_classes == 3 else []))
    x = torch.randn(len(y), 2, 3, 8, generator=g)
    x[..., 0] += y.float()[:, None, None]
    src = ArraySource(x, y, batch_size=len(y), shuffle=False)
    counts = np.bincount(y.numpy(), minlength=n_classes)
    v_none = variant(n_classes=n_classes, lr=0.05, epochs=1, seed=3)
    v_bal = variant(n_classes=n_classes, lr=0.05, epochs=1, seed=3, class_weight="balanced")
    metric = "f1" if n_classes == 2 else "accuracy"
    none, bal = fit_shared([v_none, v_bal], src, src, metric, counts, progress=False)

    torch.manual_seed(3)
    init = build_probe(v_none.probe)
    with torch.no_grad():
        logits = init(x, torch.ones(len(y), 3, dtype=torch.bool))
        if n_classes == 2:
            expected_none = F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
            pos_weight = torch.tensor([9 / 3])  # n_negative / n_positive
            expected_bal = F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), pos_weight=pos_weight)
        else:
            expected_none = F.cross_entropy(logits, y)
            weight = torch.tensor([18 / (3 * 9), 18 / (3 * 3), 18 / (3 * 6)])  # N / (C * n_c)
            expected_bal = F.cross_entropy(logits, y, weight=weight)
    assert none.history[0]["train_loss"] == pytest.approx(float(expected_none), rel=1e-5)
    assert bal.history[0]["train_loss"] == pytest.approx(float(expected_bal), rel=1e-5)
    assert bal.history[0]["train_loss"] != pytest.approx(none.history[0]["train_loss"], rel=1e-3)
    assert not torch.equal(none.probe.head.weight, bal.probe.head.weight)  # the same init, other gradients


# ---- predict ------------------------------------------------------------------------------------------------


def test_predict_scores_every_probe_in_one_read_with_layer_weights(store):
    probes = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        probes.append(build_probe(ProbeConfig("scoring", 4, 64)))
    with torch.no_grad():
        probes[1].layer_block.w.normal_()
    reads = []
    src = TokenBatches(store, SplitSpec("test"), None, 4, shuffle=False)

    def batches():
        for batch in src.epoch(0):
            reads.append(batch.example_ids)
            yield batch

    pred = predict(probes, batches(), weights_of=1)
    ids = store.manifest(split="test", columns=["example_id"])["example_id"].to_pylist()
    assert pred.example_ids == ids == [i for r in reads for i in r]  # one read
    assert len(pred.scores) == 2 and all(s.shape == (10,) and ((s >= 0) & (s <= 1)).all() for s in pred.scores)
    assert pred.layer_weights.shape == (10, 4)
    np.testing.assert_allclose(pred.layer_weights.sum(axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(pred.layer_weights, 0.25)  # the gate of probe 1, not probe 0's uniform one
    alone = predict([probes[0]], src.epoch(0)).scores[0]
    np.testing.assert_array_equal(alone, pred.scores[0])


# ---- splits ---------------------------------------------------------------------------------------------------


def test_store_splits_are_used_as_they_are(store):
    splits = resolve_splits(store)
    assert splits.train == SplitSpec("train") and splits.validation == SplitSpec("validation")
    assert splits.test == SplitSpec("test")
    assert resolve_splits(store, test=None).test is None
    assert resolve_splits(store, test="holdout").test is None  # a store without the test split reports null


def test_validation_is_carved_from_train_stratified_disjoint_deterministic(carve_store):
    train_ids, train_labels = split_examples(carve_store, SplitSpec("train"))
    assert len(train_ids) == 40 and "validation" not in carve_store.info["dataset"]["split_sizes"]
    splits = resolve_splits(carve_store)
    assert splits.validation.carved and splits.train.carved
    assert splits.validation.split == splits.train.split == "train"
    val, tr = splits.validation.ids, splits.train.ids
    assert not val & tr and val | tr == set(train_ids)  # disjoint, together the whole train split
    label_of = dict(zip(train_ids, train_labels.tolist(), strict=True))
    for cls in (0, 1):  # stratified: round(10 %) of each class's 20 examples
        assert sum(label_of[i] == cls for i in val) == 2
    assert resolve_splits(carve_store) == splits  # deterministic
    quarter = resolve_splits(carve_store, validation_fraction=0.25).validation.ids
    assert [sum(label_of[i] == c for i in quarter) for c in (0, 1)] == [5, 5]
    assert resolve_splits(carve_store, carve_seed=1).validation.ids != val  # the carve seed, not a probe seed
    assert splits.validation.describe() == {"split": "train", "carved": True, "n_examples": 4}
    # both batch sources read exactly the carved subsets
    for cls in (TokenBatches, PooledBatches):
        for spec in (splits.validation, splits.train):
            seen = [i for b in cls(carve_store, spec, None, 8, shuffle=True).epoch(0) for i in b.example_ids]
            assert sorted(seen) == sorted(spec.ids)
    with pytest.raises(TrainError, match="--validation-fraction"):
        resolve_splits(carve_store, validation_fraction=1.0)


def test_carve_does_not_depend_on_manifest_order():
    ids = [f"x{i:03d}" for i in range(50)]
    labels = np.array([i % 3 == 0 for i in range(50)], dtype=np.int64)
    chosen = carve(ids, labels, 0.2, seed=0)
    perm = np.random.default_rng(7).permutation(50)
    assert carve([ids[i] for i in perm], labels[perm], 0.2, seed=0) == chosen
    assert sum(labels[ids.index(i)] for i in chosen) == round(0.2 * labels.sum())
    # a class of one example stays in train; a class of two gives one
    assert carve(["a", "b", "c"], np.array([0, 0, 1]), 0.1, seed=0) in ({"a"}, {"b"})


def test_store_without_train_split_is_a_clear_error(extract_fp32):
    only_test = extract_fp32("trainer-test-only", splits=("test",))
    with pytest.raises(TrainError, match=r"no committed 'train' examples.*test \(10\).*--train-split"):
        resolve_splits(only_test)


# ---- pooled tier vs token stream --------------------------------------------------------------------------


def test_batch_source_uses_the_pooled_tier_only_for_mean_pooling_of_raw_states(store):
    spec = SplitSpec("validation")
    pooled = ProbeConfig("pooling", 4, 64, pool="mean", norm="none")
    assert isinstance(batch_source(store, spec, pooled, None, 4, False), PooledBatches)
    for probe, pool, norm in (("pooling", "mean", "rms"), ("pooling", "max", "none"), ("scoring", "mean", "none"),
                              ("mha", "mean", "none"), ("mha", "max", "rms")):
        config = ProbeConfig(probe, 4, 64, pool=pool, norm=norm)
        assert isinstance(batch_source(store, spec, config, None, 4, False), TokenBatches)


@pytest.mark.parametrize("layers", [None, [1, 3]])
def test_pooled_batches_give_the_token_stream_result_for_mean_pooling(store, layers):
    n_layers = 4 if layers is None else len(layers)
    torch.manual_seed(0)
    probe = build_probe(ProbeConfig("pooling", n_layers, 64, norm="none"))
    for split in ("train", "test"):
        spec = SplitSpec(split)
        tokens = predict([probe], TokenBatches(store, spec, layers, 8, shuffle=False).epoch(0))
        pooled = predict([probe], PooledBatches(store, spec, layers, 8, shuffle=False).epoch(0))
        assert tokens.example_ids == pooled.example_ids
        np.testing.assert_array_equal(tokens.labels, pooled.labels)
        np.testing.assert_allclose(tokens.scores[0], pooled.scores[0], rtol=1e-5, atol=1e-6)
    # and training on either (same order: manifest order, no shuffle) gives the same probe
    splits = resolve_splits(store)
    v = Variant(ProbeConfig("pooling", n_layers, 64, norm="none"), TrainConfig(lr=5e-2, batch_size=8, epochs=2))
    fits = [fit_shared([v], cls(store, splits.train, layers, 8, shuffle=False),
                       cls(store, splits.validation, layers, 8, shuffle=False), "accuracy", _counts(store),
                       progress=False)[0] for cls in (TokenBatches, PooledBatches)]
    assert_same_state(fits[0].probe, fits[1].probe, exact=False)
    assert fits[0].best_epoch == fits[1].best_epoch
    # with RMS-normalised tokens the stored mean is no substitute: the mean of normalised tokens differs
    rms = ProbeConfig("pooling", n_layers, 64, norm="rms")
    torch.manual_seed(0)
    probe = build_probe(rms)
    spec = SplitSpec("test")
    tokens = predict([probe], TokenBatches(store, spec, layers, 8, shuffle=False).epoch(0)).scores[0]
    pooled = predict([probe], PooledBatches(store, spec, layers, 8, shuffle=False).epoch(0)).scores[0]
    assert not np.allclose(tokens, pooled, rtol=1e-4, atol=1e-5)
