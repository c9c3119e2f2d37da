"""Baselines the probes are compared against: linear layer sweep, MULI, TF-IDF (design.md §2).

- **linear**: a logistic probe on one layer's pooled vector (N, d), one model per layer of an (N, L', d)
  array, the layer picked on validation (``layer_sweep``).
- **MULI**: L1-regularised logistic regression on the stored next-token logits (N, V)
  (``fit_logistic(..., penalty="l1")`` / ``select_C``).
- **TF-IDF**: a text-only reference, word 1-2 grams + logistic regression (``fit_tfidf`` / ``select_tfidf_C``).

scikit-learn fits; the fitted parameters are then copied into plain float32 arrays (``LogisticModel``), so
prediction is a few lines of numpy and an artifact is a safetensors file with its config as JSON in the
metadata: no sklearn object is kept and nothing is ever pickled.

Decisions:

- Features are standardised with the training split's mean and std (std 0 -> 1, so a constant feature
  contributes nothing), stored in the model and applied by ``predict_proba``: a C value means the same
  thing for every layer and for logits of any scale. Training and prediction standardise with the same
  float32-stored statistics in float64 arithmetic, so a model predicts its own training data exactly as it
  saw it. The training matrix is densified once in float64 (N x F x 8 bytes; ~2 GB for 5k examples with a
  50k vocabulary of logits); ``predict_proba`` works in row chunks.
- Solvers: L2 -> lbfgs (smooth, fast on standardised dense data). L1 -> liblinear for a binary task: its
  coordinate descent is the fastest exact L1 solver and gives true zeros, but it cannot fit a multinomial
  model, so a multiclass L1 fit uses saga (the only sklearn solver with multinomial + L1). liblinear
  penalises the intercept like a weight; ``intercept_scaling=10`` cuts that penalty tenfold so an
  imbalanced task keeps its base rate. More than two classes are always fitted as one multinomial
  (softmax) model, never one-vs-rest: sklearn's default for lbfgs and saga.
- ``max_iter=1000`` (sklearn's 100 is too few for saga and for weakly regularised fits). ConvergenceWarnings
  are left visible on purpose: a fit that did not converge should be re-run with a larger ``max_iter``.
- Every class in [0, n_classes) must occur in the training labels: sklearn would silently fit fewer
  classes and the (K, F) layout would no longer match ``n_classes``.
- Model selection (``select_C``, ``layer_sweep``): a binary model is scored on validation at the threshold
  tuned on that same validation split (``tune_threshold``), as the probes are; multiclass uses the argmax.
  Ties go to the smaller C and to the earlier layer.
- TF-IDF: ``TfidfVectorizer`` with word 1-2 grams, sublinear tf (1 + log tf: a repeated word should not
  dominate), sklearn's default ``token_pattern`` and lowercasing, ``min_df=2`` (a term seen once cannot
  generalise) and ``max_features=50_000`` (bounds the artifact and the fit); smooth idf and L2 row norm are
  sklearn's defaults. The classifier sees the sparse tf-idf rows unscaled (mean 0, scale 1: centring would
  densify them). After fitting, only the vocabulary and idf are kept: prediction always rebuilds the
  transform from them (``TfidfVectorizer(vocabulary=...)`` with ``idf_`` set), so a loaded model predicts
  exactly what the fitted one did.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from .errors import TrainError
from .metrics import METRICS, Metrics, compute_metrics, tune_threshold

if TYPE_CHECKING:  # scikit-learn and scipy load only when a baseline is fitted or a TF-IDF model transforms text:
    # serving a probe (which reads LogisticModel files) never imports them
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer

__all__ = [
    "LayerSweep",
    "LogisticModel",
    "TfidfModel",
    "fit_logistic",
    "fit_tfidf",
    "layer_sweep",
    "read_metadata",
    "select_C",
    "select_tfidf_C",
]

PENALTIES = ("l1", "l2")
DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)
FORMAT_VERSION = "1"
_FORMAT_KEY = "probecache.baseline_format"
_CONFIG_KEY = "probecache.baseline_config"
_METADATA_KEY = "probecache.metadata"
_VOCAB_KEY = "probecache.tfidf_vocabulary"
_CHUNK = 1 << 22  # predict_proba: elements per row chunk (32 MiB of float64)


def _penalty_kwargs(penalty: str) -> dict:
    """sklearn 1.8 deprecated ``penalty`` (removed in 1.10) for ``l1_ratio``; older versions ignore l1_ratio unless
    penalty="elasticnet". Whichever spelling this sklearn understands."""
    from sklearn.linear_model import LogisticRegression

    param = inspect.signature(LogisticRegression).parameters.get("penalty")
    use_l1_ratio = param is None or param.default == "deprecated"
    return {"l1_ratio": float(penalty == "l1")} if use_l1_ratio else {"penalty": penalty}


# ---------------------------------------------------------------------------------------------------- inputs


def _to_numpy(x) -> np.ndarray:
    """numpy or torch (any dtype, any device) -> numpy, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype.itemsize < 4:  # bf16 has no numpy twin; fp16 -> float32 too
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _features(x, name: str = "x") -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, F) feature array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():  # from the store in every command: its data, not a caller's bug
        raise TrainError(f"{name} contains NaN or infinite values ({int((~np.isfinite(arr)).sum())} entries): the "
                         f"store holds non-finite states (fp16 overflows; re-extract with --dtype bf16 or fp32)")
    return arr


def _labels(y, n_classes: int, n: int, name: str = "y") -> np.ndarray:
    arr = _to_numpy(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} labels but x has {n} rows")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"{name} must lie in [0, {n_classes - 1}] for {n_classes} classes")
    return arr


def _check_options(n_classes: int, penalty: str, C: float, metric: str | None = None) -> None:
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    if not (np.isfinite(C) and C > 0):
        raise ValueError(f"C must be a positive finite number, got {C}")
    if metric is not None and metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


# ---------------------------------------------------------------------------------------------------- model


@dataclass(eq=False)
class LogisticModel:
    """A fitted (multinomial) logistic regression as plain arrays; no sklearn needed to predict or load."""

    coef: np.ndarray  # (K, F) float32; K = 1 for binary, C for multiclass
    intercept: np.ndarray  # (K,) float32
    mean: np.ndarray  # (F,) float32, standardisation fitted on train (0 for tf-idf)
    scale: np.ndarray  # (F,) float32, std with 0 replaced by 1 (1 for tf-idf)
    n_classes: int
    penalty: str  # "l2" | "l1"
    C: float

    def __post_init__(self) -> None:
        self.coef, self.intercept, self.mean, self.scale = (
            np.ascontiguousarray(a, dtype=np.float32) for a in (self.coef, self.intercept, self.mean, self.scale))
        self.n_classes, self.C = int(self.n_classes), float(self.C)
        _check_options(self.n_classes, self.penalty, self.C)
        k = 1 if self.n_classes == 2 else self.n_classes
        f = self.coef.shape[-1] if self.coef.ndim == 2 else -1
        if self.coef.shape != (k, f) or self.intercept.shape != (k,) or self.mean.shape != (f,) \
                or self.scale.shape != (f,):
            raise ValueError(f"inconsistent logistic model for {self.n_classes} classes: coef {self.coef.shape}, "
                             f"intercept {self.intercept.shape}, mean {self.mean.shape}, scale {self.scale.shape}; "
                             f"expected ({k}, F), ({k},), (F,), (F,)")

    @property
    def n_features(self) -> int:
        return self.coef.shape[1]

    def decision_function(self, x) -> np.ndarray:
        """Logits (N, K) in float64. ``x``: (N, F) dense numpy/torch, or a scipy sparse matrix."""
        coef64, intercept64 = self.coef.astype(np.float64), self.intercept.astype(np.float64)
        mean64, scale64 = self.mean.astype(np.float64), self.scale.astype(np.float64)
        if hasattr(x, "tocsr"):  # a scipy sparse matrix (TF-IDF rows)
            if x.ndim != 2 or x.shape[1] != self.n_features:
                raise ValueError(f"x must be (N, {self.n_features}), got shape {x.shape}")
            # fold the standardisation into the weights: centring would densify x
            w = coef64 / scale64  # (K, F)
            z = np.asarray(x.tocsr().astype(np.float64) @ w.T) + (intercept64 - w @ mean64)
        else:
            x = _to_numpy(x)
            if x.ndim != 2 or x.shape[1] != self.n_features:
                raise ValueError(f"x must be (N, {self.n_features}), got shape {x.shape}")
            rows = max(1, _CHUNK // max(1, self.n_features))
            z = np.empty((x.shape[0], coef64.shape[0]))  # (N, K)
            for start in range(0, x.shape[0], rows):
                chunk = (x[start:start + rows].astype(np.float64) - mean64) / scale64  # as in training
                z[start:start + rows] = chunk @ coef64.T + intercept64
        if not np.isfinite(z).all():
            raise ValueError("non-finite logits: x contains NaN or infinite values")
        return z

    def predict_proba(self, x) -> np.ndarray:
        """(N,) P(class 1) for a binary model, (N, C) softmax probabilities otherwise; float64 in [0, 1]."""
        z = self.decision_function(x)
        if self.n_classes == 2:
            p = 0.5 * (1.0 + np.tanh(0.5 * z[:, 0]))  # the logistic function, without overflow for any z
        else:
            e = np.exp(z - z.max(axis=1, keepdims=True))  # softmax, shifted: exp never overflows
            p = e / e.sum(axis=1, keepdims=True)
        return np.clip(p, 0.0, 1.0)

    def _config(self) -> dict:
        return {"kind": "logistic", "n_classes": self.n_classes, "penalty": self.penalty, "C": self.C}

    def _tensors(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef, "intercept": self.intercept, "mean": self.mean, "scale": self.scale}

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """safetensors: coef/intercept/mean/scale, the config and ``metadata`` as JSON in the file's metadata."""
        _save(path, self._tensors(), self._config(), metadata)

    @classmethod
    def load(cls, path: str | Path) -> LogisticModel:
        tensors, config, _ = _load(path, "logistic")
        return cls._from(tensors, config, path)

    @classmethod
    def _from(cls, tensors: dict, config: dict, path) -> LogisticModel:
        try:
            return cls(coef=tensors["coef"], intercept=tensors["intercept"], mean=tensors["mean"],
                       scale=tensors["scale"], n_classes=config["n_classes"], penalty=config["penalty"], C=config["C"])
        except KeyError as e:
            raise TrainError(f"{path}: incomplete baseline model: no {e.args[0]!r}") from e
        except ValueError as e:  # the model's own consistency checks, on what the file holds
            raise TrainError(f"{path}: inconsistent baseline model ({e}): retrain the run") from e


# ---------------------------------------------------------------------------------------------------- artifacts


def _save(path, tensors: dict, config: dict, metadata: dict | None, extra: dict | None = None) -> None:
    try:
        meta = {"format": "np", _FORMAT_KEY: FORMAT_VERSION, _CONFIG_KEY: json.dumps(config, sort_keys=True),
                _METADATA_KEY: json.dumps(metadata or {}, sort_keys=True), **(extra or {})}
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta)


def _open(path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such baseline file: {path}")
    try:
        return safe_open(str(path), framework="np")
    except SafetensorError as e:
        raise TrainError(f"{path} is not a safetensors file ({e}): retrain the run, or restore its probe.safetensors "
                         f"from a copy") from e


def _load(path, kind: str) -> tuple[dict[str, np.ndarray], dict, dict]:
    with _open(path) as f:
        meta = f.metadata() or {}
        if _CONFIG_KEY not in meta:
            raise TrainError(f"{path} is not a probecache baseline: its safetensors metadata has no {_CONFIG_KEY}")
        if meta.get(_FORMAT_KEY) != FORMAT_VERSION:
            raise TrainError(f"{path} has baseline format {meta.get(_FORMAT_KEY)!r}; this version reads "
                             f"{FORMAT_VERSION!r}: upgrade probecache")
        config = json.loads(meta[_CONFIG_KEY])
        if config.get("kind") != kind:
            raise TrainError(f"{path} holds a {config.get('kind')!r} baseline, not a {kind!r} one")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return tensors, config, meta


def read_metadata(path: str | Path) -> dict:
    """The caller's ``metadata`` dict saved with a baseline (``{}`` if none); raises like ``load``."""
    with _open(path) as f:
        meta = f.metadata() or {}
    if _CONFIG_KEY not in meta:
        raise TrainError(f"{path} is not a probecache baseline: its safetensors metadata has no {_CONFIG_KEY}")
    return json.loads(meta.get(_METADATA_KEY, "{}"))


# ---------------------------------------------------------------------------------------------------- fitting


def _fit(x, y: np.ndarray, n_classes: int, penalty: str, C: float, class_weight, seed: int, max_iter: int,
         standardise: bool) -> LogisticModel:
    """x: dense (N, F) checked array or sparse CSR (then not standardised); y: checked labels."""
    missing = sorted(set(range(n_classes)) - set(np.unique(y).tolist()))
    if missing:
        what = "a single class" if len(missing) == n_classes - 1 else f"no example of class(es) {missing}"
        raise TrainError(f"the training labels have {what}: every one of the {n_classes} classes must occur")
    n_features = x.shape[1]
    if standardise:
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)  # (F,)
        xs = x.astype(np.float64)  # (N, F), the one float64 copy
        xs -= mean
        std = np.sqrt(np.einsum("ij,ij->j", xs, xs) / xs.shape[0])  # no (N, F) temporary
        scale = np.where(std > 0, std, 1.0).astype(np.float32)
        xs /= scale  # bit-identical to predict_proba's (x - mean) / scale
    else:
        mean, scale = np.zeros(n_features, np.float32), np.ones(n_features, np.float32)
        xs = x
    solver = "lbfgs" if penalty == "l2" else "liblinear" if n_classes == 2 else "saga"
    kwargs = _penalty_kwargs(penalty)
    if solver == "liblinear":
        kwargs["intercept_scaling"] = 10.0
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, solver=solver, class_weight=class_weight, random_state=seed, max_iter=max_iter,
                             **kwargs)
    clf.fit(xs, y)
    return LogisticModel(coef=clf.coef_, intercept=clf.intercept_, mean=mean, scale=scale, n_classes=n_classes,
                         penalty=penalty, C=C)


def fit_logistic(x, y, n_classes: int, *, penalty: str = "l2", C: float = 1.0, class_weight=None, seed: int = 0,
                 max_iter: int = 1000) -> LogisticModel:
    """Standardised logistic regression on x (N, F) with labels y (N,) in [0, n_classes).

    ``class_weight``: None, "balanced" (n / (C * count) per class) or a {class: weight} dict.
    """
    _check_options(n_classes, penalty, C)
    xa = _features(x)
    return _fit(xa, _labels(y, n_classes, xa.shape[0]), n_classes, penalty, C, class_weight, seed, max_iter, True)


def _score(predict, x_val, y_val: np.ndarray, n_classes: int, metric: str) -> tuple[Metrics, float | None]:
    """Validation metrics; binary at the threshold tuned on this split."""
    p = predict(x_val)
    if n_classes == 2:
        t = tune_threshold(y_val, p, metric)
        return compute_metrics(y_val, p, t), t
    return compute_metrics(y_val, p), None


def _select(fit_one, predict_of, x_val, y_val, n_classes: int, Cs: Sequence[float], metric: str):
    if not len(Cs):
        raise ValueError("Cs is empty: give at least one C")
    best, best_key, results = None, None, []
    for C in Cs:
        model = fit_one(float(C))
        m, t = _score(predict_of(model), x_val, y_val, n_classes, metric)
        results.append({"C": float(C), "validation": m.to_dict(), "threshold": t})
        key = (getattr(m, metric), -float(C))  # higher metric, then smaller C
        if best_key is None or key > best_key:
            best, best_key = model, key
    return best, results


def select_C(x_train, y_train, x_val, y_val, n_classes: int, *, Cs: Sequence[float] = DEFAULT_CS,
             metric: str = "f1", penalty: str = "l2", class_weight=None, seed: int = 0,
             max_iter: int = 1000) -> tuple[LogisticModel, list[dict]]:
    """One model per C on train, scored on validation: the best model and, per C,
    ``{"C", "validation": Metrics.to_dict(), "threshold"}`` (threshold None for multiclass)."""
    for C in Cs:
        _check_options(n_classes, penalty, C, metric)
    xt, xv = _features(x_train, "x_train"), _features(x_val, "x_val")
    if xv.shape[1] != xt.shape[1]:
        raise ValueError(f"x_train has {xt.shape[1]} features but x_val has {xv.shape[1]}")
    yt = _labels(y_train, n_classes, xt.shape[0], "y_train")
    yv = _labels(y_val, n_classes, xv.shape[0], "y_val")
    return _select(lambda C: _fit(xt, yt, n_classes, penalty, C, class_weight, seed, max_iter, True),
                   lambda model: model.predict_proba, xv, yv, n_classes, Cs, metric)


# ---------------------------------------------------------------------------------------------------- layer sweep


@dataclass(eq=False)
class LayerSweep:
    layers: list[int]  # store layer indices swept, one per slice x[:, i]
    validation: list[dict]  # per layer: Metrics.to_dict() (binary: at that layer's tuned threshold)
    thresholds: list[float | None]  # per layer; None for multiclass
    models: list[LogisticModel]
    best: int  # index into layers of the best validation metric (ties -> earlier layer)

    @property
    def best_layer(self) -> int:
        return self.layers[self.best]

    @property
    def best_model(self) -> LogisticModel:
        return self.models[self.best]


def layer_sweep(x_train, y_train, x_val, y_val, layers: Sequence[int], n_classes: int, *, metric: str = "f1",
                C: float = 1.0, class_weight=None, seed: int = 0, max_iter: int = 1000,
                progress: bool = False) -> LayerSweep:
    """The "linear" baseline: one logistic model per layer of x (N, L', d), numpy or torch."""
    _check_options(n_classes, "l2", C, metric)
    if not len(layers):
        raise ValueError("layers is empty: nothing to sweep")
    for name, x in (("x_train", x_train), ("x_val", x_val)):
        if len(x.shape) != 3 or x.shape[1] != len(layers):
            raise ValueError(f"{name} must be (N, L'={len(layers)}, d) for {len(layers)} layers, "
                             f"got shape {tuple(x.shape)}")
    if x_train.shape[2] != x_val.shape[2]:
        raise ValueError(f"x_train has d = {x_train.shape[2]} but x_val has d = {x_val.shape[2]}")
    yt = _labels(y_train, n_classes, x_train.shape[0], "y_train")
    yv = _labels(y_val, n_classes, x_val.shape[0], "y_val")
    validation, thresholds, models, values = [], [], [], []
    for i in tqdm(range(len(layers)), desc="layer sweep", unit="layer", disable=not progress):
        # slice before converting: a bf16 torch tensor is widened one layer at a time
        xt, xv = _features(x_train[:, i], "x_train"), _features(x_val[:, i], "x_val")
        model = _fit(xt, yt, n_classes, "l2", float(C), class_weight, seed, max_iter, True)
        m, t = _score(model.predict_proba, xv, yv, n_classes, metric)
        validation.append(m.to_dict())
        thresholds.append(t)
        models.append(model)
        values.append(getattr(m, metric))
    best = int(np.argmax(values))  # the first maximum: ties go to the earlier layer
    return LayerSweep(layers=[int(v) for v in layers], validation=validation, thresholds=thresholds, models=models,
                      best=best)


# ---------------------------------------------------------------------------------------------------- TF-IDF


def _vectorizer(vocabulary: dict[str, int], idf: np.ndarray, ngram_range=(1, 2), lowercase: bool = True,
                sublinear_tf: bool = True) -> TfidfVectorizer:
    """The tf-idf transform rebuilt from a fixed vocabulary and idf: the only one ever used to predict."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(vocabulary=vocabulary, ngram_range=tuple(ngram_range), lowercase=lowercase,
                          sublinear_tf=sublinear_tf)
    vec.idf_ = np.array(idf, dtype=np.float64)  # the setter also checks len(vocabulary) == len(idf)
    return vec


@dataclass(eq=False)
class TfidfModel:
    vocabulary: dict[str, int]  # term -> column, columns 0..V-1
    idf: np.ndarray  # (V,) float64, sklearn's idf_ (kept in float64 so the transform is reproduced exactly)
    model: LogisticModel  # on the (N, V) sparse tf-idf rows, mean 0 / scale 1
    ngram_range: tuple[int, int] = (1, 2)
    lowercase: bool = True
    sublinear_tf: bool = True
    _vec: TfidfVectorizer | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.vocabulary = {str(k): int(v) for k, v in self.vocabulary.items()}
        self.idf = np.ascontiguousarray(self.idf, dtype=np.float64)
        self.ngram_range = (int(self.ngram_range[0]), int(self.ngram_range[1]))
        n = len(self.vocabulary)
        if sorted(self.vocabulary.values()) != list(range(n)) or self.idf.shape != (n,) \
                or self.model.n_features != n:
            raise ValueError(f"inconsistent TF-IDF model: {n} terms, idf {self.idf.shape}, "
                             f"classifier on {self.model.n_features} features")

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """texts -> (N, V) sparse CSR float64 tf-idf rows."""
        if self._vec is None:
            self._vec = _vectorizer(self.vocabulary, self.idf, self.ngram_range, self.lowercase, self.sublinear_tf)
        return self._vec.transform(_texts(texts))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) P(class 1) for binary, (N, C) otherwise, like ``LogisticModel.predict_proba``."""
        return self.model.predict_proba(self.transform(texts))

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """safetensors: idf/coef/intercept/mean/scale; config, terms (list index = column) and metadata as JSON."""
        config = {**self.model._config(), "kind": "tfidf", "ngram_range": list(self.ngram_range),
                  "lowercase": self.lowercase, "sublinear_tf": self.sublinear_tf}
        terms = sorted(self.vocabulary, key=self.vocabulary.__getitem__)
        _save(path, {**self.model._tensors(), "idf": self.idf}, config, metadata,
              extra={_VOCAB_KEY: json.dumps(terms, ensure_ascii=False)})

    @classmethod
    def load(cls, path: str | Path) -> TfidfModel:
        tensors, config, meta = _load(path, "tfidf")
        if _VOCAB_KEY not in meta or "idf" not in tensors:
            raise TrainError(f"{path}: incomplete TF-IDF baseline (no vocabulary or idf)")
        terms = json.loads(meta[_VOCAB_KEY])
        if len(set(terms)) != len(terms):
            raise TrainError(f"{path}: the TF-IDF vocabulary has duplicate terms")
        model = LogisticModel._from(tensors, config, path)
        try:
            return cls(vocabulary={t: i for i, t in enumerate(terms)}, idf=tensors["idf"], model=model,
                       ngram_range=tuple(config["ngram_range"]), lowercase=config["lowercase"],
                       sublinear_tf=config["sublinear_tf"])
        except KeyError as e:
            raise TrainError(f"{path}: incomplete TF-IDF baseline: no {e.args[0]!r}") from e
        except ValueError as e:  # the model's own consistency checks, on what the file holds
            raise TrainError(f"{path}: inconsistent TF-IDF baseline ({e}): retrain the run") from e


def _texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must all be strings; entry {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


def _tfidf_train(texts, y, n_classes: int, min_df: int, max_features: int, name: str = "y"):
    """Fit the vocabulary on the training texts: (vocabulary, idf, transform, x (N, V) CSR, labels)."""
    texts = _texts(texts)
    labels = _labels(y, n_classes, len(texts), name)
    from sklearn.feature_extraction.text import TfidfVectorizer

    fitted = TfidfVectorizer(ngram_range=(1, 2), lowercase=True, sublinear_tf=True, min_df=min_df,
                             max_features=max_features)
    try:
        fitted.fit(texts)
    except ValueError as e:  # "After pruning, no terms remain" / "empty vocabulary"
        raise TrainError(f"TF-IDF found no usable terms in {len(texts)} training texts (min_df={min_df}): {e}") from e
    vocabulary = {k: int(v) for k, v in fitted.vocabulary_.items()}
    vec = _vectorizer(vocabulary, fitted.idf_)
    return vocabulary, fitted.idf_, vec, vec.transform(texts), labels


def fit_tfidf(texts, y, n_classes: int, *, C: float = 1.0, class_weight=None, seed: int = 0, min_df: int = 2,
              max_features: int = 50_000, max_iter: int = 1000) -> TfidfModel:
    """Word 1-2 gram TF-IDF + L2 logistic regression on ``texts`` with labels ``y`` in [0, n_classes)."""
    _check_options(n_classes, "l2", C)
    vocabulary, idf, _, x, labels = _tfidf_train(texts, y, n_classes, min_df, max_features)
    return TfidfModel(vocabulary, idf, _fit(x, labels, n_classes, "l2", C, class_weight, seed, max_iter, False))


def select_tfidf_C(train_texts, y_train, val_texts, y_val, n_classes: int, *, Cs: Sequence[float] = DEFAULT_CS,
                   metric: str = "f1", class_weight=None, seed: int = 0, min_df: int = 2,
                   max_features: int = 50_000, max_iter: int = 1000) -> tuple[TfidfModel, list[dict]]:
    """The vocabulary is fitted once on train; one classifier per C, selected and reported as in ``select_C``."""
    for C in Cs:
        _check_options(n_classes, "l2", C, metric)
    vocabulary, idf, vec, xt, yt = _tfidf_train(train_texts, y_train, n_classes, min_df, max_features, "y_train")
    val_texts = _texts(val_texts)
    yv = _labels(y_val, n_classes, len(val_texts), "y_val")
    return _select(lambda C: TfidfModel(vocabulary, idf, _fit(xt, yt, n_classes, "l2", C, class_weight, seed,
                                                               max_iter, False)),
                   lambda tm: tm.model.predict_proba, vec.transform(val_texts), yv, n_classes, Cs, metric)
