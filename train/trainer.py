"""The streaming trainer: many probe variants fitted in one pass over the data (design.md §2, §7).

:func:`fit_shared` reads every training batch once and hands it to every variant still training, then reads
the validation split once per epoch and scores every variant on it. Variants differ in anything that does not
change the batches: probe type and shape, learning rate, weight decay, class weighting, epochs, patience and
seed. Batch size and layer subset change the batches, so :mod:`probecache.train.sweep` runs one shared pass per
(batch size, layers, data tier) group.

Protocol (the paper's, with the choices it leaves open made explicit):

- AdamW (betas 0.9, 0.999), cosine decay from ``lr`` to 0 over ``epochs x batches`` steps, no warmup.
- Loss: binary tasks have one logit and BCE-with-logits (``class_weight="balanced"`` sets pos_weight =
  n_negative / n_positive); C classes use cross-entropy (balanced: weight_c = N / (C * n_c)).
- After each epoch the validation metric (F1 or accuracy) is computed at the threshold tuned on validation
  (binary; multiclass uses the argmax); the best epoch's weights are kept (a CPU copy), and a variant stops
  after ``patience`` epochs without improvement or at ``epochs``.
- Seeds: ``seed`` fixes a variant's initialisation (``torch.manual_seed`` right before the probe is built).
  In a shared pass every variant sees the same batches, in an order fixed by the data seed of the pass:
  seeds vary initialisation, not data order.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .choices import CLASS_WEIGHTS  # defined there: the CLI's --help names it without torch
from .errors import TrainError
from .loaders import Batch
from .metrics import compute_metrics, tune_threshold
from .probes import Probe, ProbeConfig, build_probe


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 10
    patience: int = 3
    class_weight: str = "none"  # "none" | "balanced"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise TrainError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise TrainError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("batch_size", "epochs", "patience"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise TrainError(f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weight!r}")


@dataclass(frozen=True)
class Variant:
    """One point of a sweep: a probe architecture and how to train it."""

    probe: ProbeConfig
    train: TrainConfig

    def hyperparameters(self) -> dict:
        """What distinguishes this configuration in a results table (everything but the seed)."""
        p, t = self.probe, self.train
        out: dict = {"probe": p.name, "norm": p.norm}
        if p.name in ("pooling", "mha"):
            out["pool"] = p.pool
        if p.name == "mha":
            out |= {"downcast": p.downcast, "heads": p.heads}
        return out | {"lr": t.lr, "weight_decay": t.weight_decay, "batch_size": t.batch_size,
                      "class_weight": t.class_weight}

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.hyperparameters().items())


@dataclass
class FitResult:
    variant: Variant
    probe: Probe  # weights of the best validation epoch, eval mode
    threshold: float | None  # tuned on validation (binary), None for multiclass
    validation: dict  # Metrics.to_dict() at the tuned threshold, plus "at_0.5"
    validation_scores: tuple[np.ndarray, list[str], np.ndarray]  # labels, example ids, scores at the best epoch
    best_epoch: int
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, validation metric, lr
    train_seconds: float = 0.0  # time inside this variant's own steps and scoring (its share of a shared pass)


def evaluate(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict:
    """Metrics at the given (tuned) threshold, plus the same at 0.5 under "at_0.5" (binary tasks)."""
    out = compute_metrics(labels, scores, 0.5 if threshold is None else threshold).to_dict()
    out["at_0.5"] = compute_metrics(labels, scores, 0.5).to_dict()
    return out


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1) binary logit -> (B,) P(class 1); (B, C) -> softmax (B, C)."""
    return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def select_threshold(labels: np.ndarray, scores: np.ndarray, metric: str) -> float | None:
    return tune_threshold(labels, scores, metric) if scores.ndim == 1 else None


class _Learner:
    """One variant's probe, optimiser, schedule and early-stopping state."""

    def __init__(self, variant: Variant, steps: int, class_counts: np.ndarray, device: torch.device):
        self.variant, self.device = variant, device
        t = variant.train
        torch.manual_seed(t.seed)
        self.probe = build_probe(variant.probe).to(device)
        self.optimizer = torch.optim.AdamW(self.probe.parameters(), lr=t.lr, betas=(0.9, 0.999),
                                           weight_decay=t.weight_decay)
        total = max(steps, 1)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
        self.binary = variant.probe.n_outputs == 1
        self.weight = self._class_weight(class_counts) if t.class_weight == "balanced" else None
        self.best_score, self.best_epoch, self.bad_epochs = -math.inf, -1, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_threshold: float | None = None
        self.best_scores: tuple[np.ndarray, list[str], np.ndarray] = (np.zeros(0, dtype=np.int64), [], np.zeros(0))
        self.stopped = False
        self.history: list[dict] = []
        self.seconds = 0.0
        self._loss_sum, self._loss_n = 0.0, 0

    def _class_weight(self, counts: np.ndarray) -> torch.Tensor:
        counts = np.maximum(counts.astype(np.float64), 1.0)
        if self.binary:  # pos_weight = n_negative / n_positive
            return torch.tensor([counts[0] / counts[1]], dtype=torch.float32, device=self.device)
        return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=self.device)

    def step(self, hidden: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> None:
        start = time.perf_counter()
        self.probe.train()
        logits = self.probe(hidden, mask)  # (B, C')
        if self.binary:
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), pos_weight=self.weight)
        else:
            loss = F.cross_entropy(logits, y, weight=self.weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self._loss_sum += float(loss.detach()) * len(y)
        self._loss_n += len(y)
        self.seconds += time.perf_counter() - start

    def end_epoch(self, epoch: int, labels: np.ndarray, ids: list[str], scores: np.ndarray, metric: str,
                  patience: int, epochs: int) -> None:
        if not np.isfinite(scores).all():  # a diverged probe (or non-finite stored states): the user's to fix
            raise TrainError(f"probe {self.variant.label} scored NaN or infinite values on validation after epoch "
                             f"{epoch + 1}: training diverged; lower --lr, keep --norm rms, or check the store for "
                             f"non-finite states (an fp16 extraction can overflow)")
        threshold = select_threshold(labels, scores, metric)
        value = getattr(compute_metrics(labels, scores, 0.5 if threshold is None else threshold), metric)
        self.history.append({"epoch": epoch, "train_loss": self._loss_sum / max(self._loss_n, 1),
                             f"validation_{metric}": value, "lr": self.schedule.get_last_lr()[0]})
        self._loss_sum, self._loss_n = 0.0, 0
        if value > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_threshold, self.best_scores = threshold, (labels, ids, scores)
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.probe.state_dict().items()}
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs >= patience or epoch + 1 >= epochs

    def finish(self) -> Probe:
        probe = copy.deepcopy(self.probe)
        if self.best_state is not None:
            probe.load_state_dict(self.best_state)
        return probe.eval()


@dataclass
class Predictions:
    labels: np.ndarray  # (N,) int64, in batch order
    example_ids: list[str]
    scores: list[np.ndarray]  # per probe: (N,) P(class 1) or (N, C)
    layer_weights: np.ndarray | None = None  # (N, L1) stage-2 weights of the probe ``weights_of`` asked for


def predict(probes: Sequence[Probe], batches: Iterable[Batch], device: torch.device | str = "cpu",
            seconds: list[float] | None = None, weights_of: int | None = None) -> Predictions:
    """One read of ``batches`` scored by every probe (``seconds[i]`` accumulates probe i's compute time).

    ``weights_of``: also collect that (scoring) probe's stage-2 layer weights in the same read.
    """
    device = torch.device(device)
    labels, ids, weights = [], [], []
    outputs: list[list[torch.Tensor]] = [[] for _ in probes]
    for batch in batches:
        hidden, mask = batch.hidden.to(device), batch.mask.to(device)
        for i, probe in enumerate(probes):
            start = time.perf_counter()
            probe.eval()
            with torch.no_grad():
                outputs[i].append(probabilities(probe(hidden, mask)).to("cpu", torch.float64))
                if i == weights_of:
                    weights.append(probe.layer_weights(hidden, mask).to("cpu", torch.float64))  # (B, L1)
            if seconds is not None:
                seconds[i] += time.perf_counter() - start
        labels.append(batch.y)
        ids.extend(batch.example_ids)
    y = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
    return Predictions(y, ids, [torch.cat(o).numpy() if o else np.zeros(0) for o in outputs],
                       torch.cat(weights).numpy() if weights else None)


def fit_shared(variants: Sequence[Variant], train, validation, metric: str, class_counts: np.ndarray,
               device: torch.device | str = "cpu", progress: bool = True, description: str = "train"
               ) -> list[FitResult]:
    """Fit every variant on one shared read of ``train`` per epoch; select epochs on ``validation``.

    ``train`` / ``validation`` are batch sources (:mod:`probecache.train.data`): ``.epoch(e)`` yields batches,
    ``.n_batches`` counts them. All variants must use the batch size the source was built with.
    """
    if not variants:
        raise ValueError("no variants to train")
    device = torch.device(device)
    learners = [_Learner(v, v.train.epochs * train.n_batches, class_counts, device) for v in variants]
    max_epochs = max(v.train.epochs for v in variants)
    for epoch in range(max_epochs):
        active = [learner for learner in learners if not learner.stopped]
        if not active:
            break
        bar = tqdm(train.epoch(epoch), total=train.n_batches, disable=not progress, leave=False, unit="batch",
                   desc=f"{description} epoch {epoch + 1}/{max_epochs} ({len(active)} variant(s))")
        for batch in bar:
            hidden, mask, y = batch.hidden.to(device), batch.mask.to(device), batch.y.to(device)
            for learner in active:
                learner.step(hidden, mask, y)
        seconds = [0.0] * len(active)
        pred = predict([learner.probe for learner in active], validation.epoch(0), device, seconds)
        for learner, s, spent in zip(active, pred.scores, seconds, strict=True):
            learner.seconds += spent
            t = learner.variant.train
            learner.end_epoch(epoch, pred.labels, pred.example_ids, s, metric, t.patience, t.epochs)
    # The best epoch's validation scores came from exactly the weights kept: no extra validation pass
    return [FitResult(variant=learner.variant, probe=learner.finish(), threshold=learner.best_threshold,
                      validation=evaluate(learner.best_scores[0], learner.best_scores[2], learner.best_threshold),
                      validation_scores=learner.best_scores, best_epoch=learner.best_epoch, history=learner.history,
                      train_seconds=learner.seconds)
            for learner in learners]


def variant_record(result: FitResult) -> dict:
    """JSON-ready description of a fitted variant (for config.json / results)."""
    return {"probe_config": asdict(result.variant.probe), "train_config": asdict(result.variant.train),
            "threshold": result.threshold, "best_epoch": result.best_epoch, "history": result.history,
            "train_seconds": round(result.train_seconds, 3)}
