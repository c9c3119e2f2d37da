"""The fitting phase of a sweep: variants grouped by what changes their batches, one shared pass per group.

Both executors run this code: the local sweep (:func:`probecache.train.sweep.run_sweep`) on every variant, and
each dask task (:mod:`probecache.train.distributed`) on its share of them. A variant's result depends only on
its own seed and on the batches (fixed by the data seed, batch size and tier), never on which other variants
share its pass: ``_Learner`` seeds torch right before building its probe, training draws no random numbers,
and every learner's steps and scores touch only its own tensors. So a group may be split across tasks and
each variant still comes out bit for bit as in the whole pass (same torch thread count; tests/train/
test_sweep_dask.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import Splits, SplitSpec, batch_source, labels_of, uses_pooled_tier
from .loaders import Layers
from .trainer import FitResult, Variant, fit_shared


def group_key(variant: Variant) -> tuple[int, bool]:
    """What changes the batches a variant reads: its batch size and data tier (pooled or tokens)."""
    p = variant.probe
    return variant.train.batch_size, uses_pooled_tier(p.name, p.pool, p.norm)


def group_variants(variants: Sequence[Variant]) -> dict[tuple[int, bool], list[Variant]]:
    """Variants by :func:`group_key`, groups and members in first-seen (grid) order."""
    groups: dict[tuple[int, bool], list[Variant]] = {}
    for v in variants:
        groups.setdefault(group_key(v), []).append(v)
    return groups


def class_counts_of(store, splits: Splits, n_classes: int) -> np.ndarray:
    """(C,) training examples per class (balanced class weights)."""
    return np.bincount(labels_of(store, splits.train), minlength=n_classes)


def fit_groups(store, variants: Sequence[Variant], splits: Splits, metric: str, layers: Layers = None,
               device: torch.device | str = "cpu", buffer_tokens: int = 65536, data_seed: int = 0,
               progress: bool = True) -> dict[Variant, FitResult]:
    """Fit ``variants`` with one :func:`fit_shared` pass per (batch size, tier) group; results by variant."""
    class_counts = class_counts_of(store, splits, variants[0].probe.n_classes)
    fitted: dict[Variant, FitResult] = {}
    for (batch_size, _), group in group_variants(variants).items():
        first = group[0].probe

        def source(spec: SplitSpec, shuffle: bool, first=first, batch_size=batch_size):
            return batch_source(store, spec, first, layers, batch_size, shuffle, data_seed, buffer_tokens)

        desc = f"{first.name} bs={batch_size}"
        for result in fit_shared(group, source(splits.train, True), source(splits.validation, False), metric,
                                 class_counts, device, progress, desc):
            fitted[result.variant] = result
    return fitted
