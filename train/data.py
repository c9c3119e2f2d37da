"""Which examples train, validate and test a run, and the batches the trainer reads (design.md §7).

Splits (:func:`resolve_splits`): a store's own ``train`` / ``validation`` / ``test`` splits are used as they
are. A store without validation gets one carved from train at train time: ``validation_fraction`` of every
class (stratified), chosen by a generator seeded with ``carve_seed`` over the sorted example ids, so the carve
is a pure function of the store's train ids and never depends on manifest order or on the probe seeds. A
store without test trains and validates normally and reports ``test: null``; nothing is ever carved out of
test, and test is read only by :func:`probecache.train.sweep.evaluate_selected`, for the selected configuration.

Batch sources (both yield :class:`~probecache.train.loaders.Batch` with hidden (B, L', T, d), mask (B, T)):

- :class:`TokenBatches`: the token-level stream (scoring, MHA, max pooling) in the stored dtype (bf16): the
  probes cast one layer at a time, so a batch is never widened whole.
- :class:`PooledBatches`: the pooled tier (the per-layer mean over tokens the extractor stored) presented as
  one-token sequences, (B, L', 1, d) with an all-true mask. For the mean-pooling probe on raw states
  (``norm="none"``) this *is* its stage 1 (the mean of a single token is that token), up to float summation
  order, at a fraction of the reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
from probecache.store.reader import Store

from .errors import TrainError
from .loaders import Batch, Layers, TokenStream, load_pooled
from .probes import ProbeConfig

VALIDATION_FRACTION = 0.1
CARVE_SEED = 0


@dataclass(frozen=True)
class SplitSpec:
    """A set of examples: one store split, or the subset ``ids`` of it (a carve)."""

    split: str
    ids: frozenset[str] | None = None  # None = every committed example of the split
    carved: bool = False  # True: validation carved from train at train time

    def describe(self) -> dict:
        out: dict = {"split": self.split, "carved": self.carved}
        if self.ids is not None:
            out["n_examples"] = len(self.ids)
        return out


@dataclass(frozen=True)
class Splits:
    train: SplitSpec
    validation: SplitSpec
    test: SplitSpec | None  # None: the store has no test split


def _split_labels(store: Store, split: str) -> tuple[list[str], np.ndarray]:
    table = store.manifest(split=split, columns=["example_id", "label"])
    ids = table["example_id"].to_pylist()
    labels = np.array([-1 if v is None else int(v) for v in table["label"].to_pylist()], dtype=np.int64)
    if (labels < 0).any():
        missing = [ids[i] for i in np.flatnonzero(labels < 0)[:3]]
        raise TrainError(f"store {store.store_id}: {int((labels < 0).sum())} example(s) of split {split!r} have no "
                         f"label (e.g. {missing}): re-extract with a label column (--label-col)")
    return ids, labels


def split_counts(store: Store) -> dict[str, int]:
    """Committed examples per split."""
    table = store.manifest(columns=["split"])
    counts = pc.value_counts(table["split"]).to_pylist()
    return {row["values"]: int(row["counts"]) for row in counts}


def carve(ids: list[str], labels: np.ndarray, fraction: float, seed: int) -> frozenset[str]:
    """A stratified ``fraction`` of every class (at least one example per class with two or more)."""
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")  # independent of manifest order
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        n = int(round(fraction * len(members)))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)  # keep at least one example of the class in train
        else:
            n = 0
        chosen.extend(ids[i] for i in rng.permutation(members)[:n])
    return frozenset(chosen)


def resolve_splits(store: Store, train: str = "train", validation: str = "validation", test: str | None = "test",
                   validation_fraction: float = VALIDATION_FRACTION, carve_seed: int = CARVE_SEED) -> Splits:
    counts = split_counts(store)
    have = ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) or "none"
    if train not in counts:
        raise TrainError(f"store {store.store_id} has no committed {train!r} examples (it has: {have}): "
                         f"pass --train-split, or finish the extraction (`probecache store status`)")
    train_ids, train_labels = _split_labels(store, train)
    if len(np.unique(train_labels)) < 2:
        raise TrainError(f"split {train!r} of store {store.store_id} has a single class: a probe needs two or more")
    if validation in counts:
        _split_labels(store, validation)  # fail early on missing labels
        train_spec, val_spec = SplitSpec(train), SplitSpec(validation)
    else:
        if not 0 < validation_fraction < 1:
            raise TrainError(f"--validation-fraction must be in (0, 1), got {validation_fraction}")
        val_ids = carve(train_ids, train_labels, validation_fraction, carve_seed)
        train_spec = SplitSpec(train, frozenset(train_ids) - val_ids, carved=True)
        val_spec = SplitSpec(train, val_ids, carved=True)
    test_spec = None
    if test is not None and test in counts:
        _split_labels(store, test)
        test_spec = SplitSpec(test)
    return Splits(train_spec, val_spec, test_spec)


def split_examples(store: Store, spec: SplitSpec) -> tuple[list[str], np.ndarray]:
    """Example ids and labels of a split spec, in manifest order."""
    ids, labels = _split_labels(store, spec.split)
    if spec.ids is None:
        return ids, labels
    keep = np.array([i in spec.ids for i in ids], dtype=bool)
    return [i for i, k in zip(ids, keep, strict=True) if k], labels[keep]


def labels_of(store: Store, spec: SplitSpec) -> np.ndarray:
    """Labels of a split spec in manifest order (for class weights and counts)."""
    return split_examples(store, spec)[1]


# ---- batch sources ---------------------------------------------------------------------------------------


class TokenBatches:
    """Token-level batches of a split spec (stored dtype); ``shuffle`` seeds the order with (seed, epoch)."""

    tier = "tokens"

    def __init__(self, store: Store, spec: SplitSpec, layers: Layers, batch_size: int, shuffle: bool,
                 seed: int = 0, buffer_tokens: int = 65536):
        self.stream = TokenStream(store, spec.split, layers=layers, batch_size=batch_size, shuffle=shuffle,
                                  seed=seed, buffer_tokens=buffer_tokens, dtype=None, ids=spec.ids)
        self.layers = self.stream.layers

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def n_batches(self) -> int:
        return self.stream.n_batches

    def epoch(self, epoch: int) -> Iterator[Batch]:
        return self.stream.epoch(epoch)


class PooledBatches:
    """The pooled tier as one-token sequences: hidden (B, L', 1, d) float32, mask (B, 1) all true."""

    tier = "pooled"

    def __init__(self, store: Store, spec: SplitSpec, layers: Layers, batch_size: int, shuffle: bool,
                 seed: int = 0, kind: str = "mean"):
        self.data = load_pooled(store, spec.split, kind=kind, layers=layers, ids=spec.ids)
        self.layers = self.data.layers
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        return len(self.data)

    @property
    def n_batches(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        n = len(self.data)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        for start in range(0, n, self.batch_size):
            idx = torch.from_numpy(order[start : start + self.batch_size])
            x = self.data.x[idx]  # (B, L', d)
            yield Batch(hidden=x[:, :, None, :], mask=torch.ones((len(idx), 1), dtype=torch.bool),
                        y=self.data.y[idx], example_ids=[self.data.example_ids[i] for i in idx.tolist()])


def uses_pooled_tier(probe: str, pool: str, norm: str) -> bool:
    """Mean pooling of raw states reads the stored per-layer means; everything else needs the tokens (the mean
    of RMS-normalised tokens is not the normalised mean)."""
    return probe == "pooling" and pool == "mean" and norm == "none"


def batch_source(store: Store, spec: SplitSpec, probe: ProbeConfig, layers: Layers, batch_size: int,
                 shuffle: bool, seed: int = 0, buffer_tokens: int = 65536) -> TokenBatches | PooledBatches:
    """The batches ``probe`` reads: the pooled tier where it is exact, else the token stream."""
    if uses_pooled_tier(probe.name, probe.pool, probe.norm):
        return PooledBatches(store, spec, layers, batch_size, shuffle, seed)
    return TokenBatches(store, spec, layers, batch_size, shuffle, seed, buffer_tokens)
