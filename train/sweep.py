"""Sweeps: a grid of probe variants x seeds trained with shared reads, selected on validation, tested once.

:func:`expand_grid` turns option lists (``--downcast 8 --downcast 32 --lr 1e-4 --lr 3e-4 --seeds 3``) into
variants. :func:`run_sweep` groups them by what changes the batches (batch size; the data tier, pooled or
tokens) and runs one :func:`~probecache.train.trainer.fit_shared` pass per group (:mod:`.groups`), so each batch
is read once for every variant of its group; with ``executor="dask"`` the groups (or a lone group's variants)
are fitted in shares on a dask cluster (:mod:`.distributed`), with the same results. Selection: the
configuration (everything but the seed) with the best *mean* validation metric over its seeds wins, ties to the
first in grid order. Test data is then read once, for that configuration's seeds only; every other row of the
results table has no test numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from probecache.cluster.dask_clusters import SlurmResources

from .data import Splits, batch_source
from .errors import TrainError
from .groups import fit_groups
from .loaders import Layers
from .options import EXECUTORS, Grid
from .probes import ProbeConfig
from .trainer import FitResult, TrainConfig, Variant, evaluate, predict

METRIC_NAMES = ("accuracy", "f1", "macro_f1", "auroc", "auprc")
HEAD_CHOICES = (8, 4, 2, 1)
# Learning rates where each probe did best with RMS-normalised tokens (SmolLM2, Rotten Tomatoes validation;
# docs/TRAINING.md): a head on pooled states wants a large step, attention a small one.
DEFAULT_LR = {"pooling": 1e-2, "scoring": 3e-3, "mha": 1e-3}


def auto_heads(d_inner: int) -> int:
    """The most heads (8, 4, 2 or 1) that divide d_inner: 8 unless the width forbids it (576 / 32 = 18 -> 2)."""
    return next(h for h in HEAD_CHOICES if d_inner % h == 0)


def expand_grid(grid: Grid, n_layers: int, hidden_size: int, n_classes: int) -> list[Variant]:
    """Every combination, in option order; options a probe does not use collapse to one value."""
    pools = grid.pools if grid.probe in ("pooling", "mha") else ("mean",)
    downcasts = grid.downcasts if grid.probe == "mha" else (8,)
    heads_options = grid.heads if grid.probe == "mha" else (8,)
    variants: dict[Variant, None] = {}
    lrs = grid.lrs or (DEFAULT_LR[grid.probe],)
    for norm, pool, downcast, heads, lr, wd, bs, cw, seed in itertools.product(
            grid.norms, pools, downcasts, heads_options, lrs, grid.weight_decays, grid.batch_sizes,
            grid.class_weights, grid.seeds):
        if heads is None:
            heads = auto_heads(hidden_size // downcast) if hidden_size % downcast == 0 else 1
        probe = ProbeConfig(grid.probe, n_layers, hidden_size, n_classes, pool=pool, downcast=downcast, heads=heads,
                            norm=norm)
        train = TrainConfig(lr=lr, weight_decay=wd, batch_size=bs, epochs=grid.epochs, patience=grid.patience,
                            class_weight=cw, seed=seed)
        variants[Variant(probe, train)] = None  # dict: ordered de-duplication
    return list(variants)


@dataclass
class SweepOutcome:
    results: list[FitResult]  # every variant, grid order
    selected: str  # the winning configuration's label
    selected_results: list[FitResult]  # its seeds
    best: FitResult  # the selected configuration's seed with the best validation metric (the saved probe)
    test: list[dict | None]  # per selected seed: metrics at its own tuned threshold (None: no test split)
    # the saved probe's scores, split -> (labels, example ids, scores)
    scores: dict[str, tuple[np.ndarray, list[str], np.ndarray]] = field(default_factory=dict)
    layer_weights: np.ndarray | None = None  # (N, L1) scoring probe's stage-2 weights on test (else validation)
    layer_weight_labels: np.ndarray | None = None
    rows: list[dict] = field(default_factory=list)  # the results table


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def summarize(metrics: list[dict]) -> dict:
    """{metric: {"mean", "std"}} over seeds (sample std, 0 for one seed)."""
    out = {}
    for name in METRIC_NAMES:
        mean, std = _mean_std([m.get(name) for m in metrics])
        out[name] = {"mean": mean, "std": std}
    return out


def _rows(results: list[FitResult], selected: str, test: list[dict | None]) -> list[dict]:
    by_label: dict[str, list[FitResult]] = {}
    for r in results:
        by_label.setdefault(r.variant.label, []).append(r)
    rows = []
    for label, group in by_label.items():
        row: dict = {"config": label, "selected": label == selected, "n_seeds": len(group)}
        row |= group[0].variant.hyperparameters()
        val = summarize([r.validation for r in group])
        tst = summarize([t for t in test if t is not None]) if label == selected and any(test) else None
        for name in METRIC_NAMES:
            row[f"validation_{name}_mean"], row[f"validation_{name}_std"] = val[name]["mean"], val[name]["std"]
            stats = tst[name] if tst else {"mean": None, "std": None}
            row[f"test_{name}_mean"], row[f"test_{name}_std"] = stats["mean"], stats["std"]
        row["best_epoch_mean"] = float(np.mean([r.best_epoch for r in group]))
        row["train_seconds_mean"] = float(np.mean([r.train_seconds for r in group]))
        rows.append(row)
    return rows


def run_sweep(store, variants: Sequence[Variant], splits: Splits, metric: str, layers: Layers = None,
              device: torch.device | str = "cpu", buffer_tokens: int = 65536, data_seed: int = 0,
              progress: bool = True, executor: str = "local", workers: int = 2, scheduler: str | None = None,
              slurm: SlurmResources = SlurmResources()) -> SweepOutcome:
    """Train every variant (one shared pass per batch-size/tier group), select on validation, test once.

    ``executor="dask"``: the fitting is split into ``workers`` shares run as dask tasks (a LocalCluster, SLURM jobs
    asking for ``slurm`` when ``scheduler`` is "slurm", or the cluster at ``scheduler``), each opening the store
    itself (:mod:`probecache.train.distributed`); selection and the one test read stay here, so the outcome is
    the local one.
    """
    if executor == "dask":
        from .distributed import fit_on_dask

        fitted = fit_on_dask(store, variants, splits, metric, layers, device, buffer_tokens, data_seed,
                             workers=workers, scheduler=scheduler, progress=progress, slurm=slurm)
    elif executor == "local":
        fitted = fit_groups(store, variants, splits, metric, layers, device, buffer_tokens, data_seed, progress)
    else:
        raise TrainError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    results = [fitted[v] for v in variants]

    # selection: best mean validation metric over seeds, ties -> first in grid order
    means: dict[str, list[float]] = {}
    for r in results:
        means.setdefault(r.variant.label, []).append(r.validation[metric])
    selected = max(means, key=lambda label: (np.mean(means[label]), -list(means).index(label)))
    chosen = [r for r in results if r.variant.label == selected]
    best = max(chosen, key=lambda r: (r.validation[metric], -chosen.index(r)))

    outcome = SweepOutcome(results=results, selected=selected, selected_results=chosen, best=best,
                           test=[None] * len(chosen), scores={"validation": best.validation_scores})
    first = chosen[0].variant.probe
    weights_of = chosen.index(best) if first.name == "scoring" else None
    for split, spec in (("test", splits.test), ("validation", splits.validation)):
        if spec is None or (split == "validation" and weights_of is None):
            continue  # validation is re-read only for the layer-weight figure of a scoring probe without test
        src = batch_source(store, spec, first, layers, chosen[0].variant.train.batch_size, False, data_seed,
                           buffer_tokens)
        pred = predict([r.probe for r in chosen], src.epoch(0), device, weights_of=weights_of)
        if split == "test":  # the one read of test data, for the selected configuration only
            outcome.test = [evaluate(pred.labels, s, r.threshold) for r, s in zip(chosen, pred.scores, strict=True)]
            outcome.scores["test"] = (pred.labels, pred.example_ids, pred.scores[chosen.index(best)])
        outcome.layer_weights, outcome.layer_weight_labels = pred.layer_weights, pred.labels
        break
    outcome.rows = _rows(results, selected, outcome.test)
    return outcome
