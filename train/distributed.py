"""A sweep's fitting phase on a dask cluster (``probecache train --executor dask``).

The variants are cut into ``workers`` shares (:func:`partition`); each share is one dask task
(:func:`fit_share`) that opens the store by its path or URL, fits its variants with the local code path
(:func:`probecache.train.groups.fit_groups`) and returns plain values: metrics, threshold, validation scores
and the best epoch's weights as numpy arrays. Nothing read from the store, no Store and no torch object
crosses the wire in either direction; the driver rebuilds each probe from its arrays, then selects and reads
test once exactly as a local sweep does (:func:`probecache.train.sweep.run_sweep`).

Same seeds, same numbers: a variant's training depends only on its own seed and the batches (train/groups.py),
and every task runs torch with the driver's intra-op thread count, because the number of threads can change a
CPU kernel's summation order and so the last bits. Bit-identity therefore holds when the workers run on the
driver's kind of CPU (a LocalCluster always); a cluster of other CPUs or GPUs agrees up to float rounding.

Partitioning keeps reads shared where it can: with at least as many (batch size, tier) groups as shares,
whole groups go to shares (largest first onto the least-loaded share), so each batch is still read once per
group; with fewer groups, a group's variants are split into contiguous runs (a configuration's seeds stay
together) and each share reads that group's batches itself.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Sequence

import numpy as np
import torch
from probecache.cluster.dask_clusters import SlurmResources, dask_client

from .data import Splits
from .errors import TrainError
from .groups import fit_groups, group_variants
from .loaders import Layers
from .options import DASK_MISSING
from .probes import build_probe
from .trainer import FitResult, Variant


def partition(variants: Sequence[Variant], n: int) -> list[list[Variant]]:
    """``variants`` cut into at most ``n`` non-empty shares, each in grid order (see the module docstring)."""
    if n < 1:
        raise TrainError(f"--workers must be a positive integer, got {n}")
    groups = list(group_variants(variants).values())
    n = min(n, len(variants))
    shares: list[list[Variant]] = [[] for _ in range(n)]
    if len(groups) >= n:  # whole groups: largest first onto the least-loaded share (ties: the lowest index)
        for group in sorted(groups, key=len, reverse=True):
            shares[min(range(n), key=lambda i: (len(shares[i]), i))].extend(group)
    else:  # every group gets one share, the rest go to whichever group has the most variants per share
        allotted = [1] * len(groups)
        for _ in range(n - len(groups)):
            i = max(range(len(groups)), key=lambda g: (len(groups[g]) / allotted[g], -g))
            allotted[i] += 1
        slot = 0
        for group, k in zip(groups, allotted, strict=True):
            for run in np.array_split(np.arange(len(group)), k):
                shares[slot].extend(group[j] for j in run)
                slot += 1
    order = {v: i for i, v in enumerate(variants)}
    return [sorted(share, key=order.__getitem__) for share in shares if share]


# ---- the worker side --------------------------------------------------------------------------------------


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A tensor as (numpy array, torch dtype name); bf16, which numpy lacks, travels as its int16 bits."""
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy(), "bfloat16"
    return t.numpy().copy(), str(t.dtype).removeprefix("torch.")


def _from_numpy(a: np.ndarray, dtype: str, device: torch.device) -> torch.Tensor:
    # clone: fresh, aligned memory (an unpickled buffer may be unaligned, and kernels chosen for it can sum in
    # another order: the driver's test scores would differ from the worker's validation scores in the last bits)
    t = torch.from_numpy(np.ascontiguousarray(a)).clone()
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device)


def _plain(result: FitResult) -> dict:
    """What a task sends back for one variant: plain Python and numpy values only."""
    labels, ids, scores = result.validation_scores
    return {"variant": result.variant, "threshold": result.threshold, "validation": result.validation,
            "validation_scores": (np.asarray(labels), list(ids), np.asarray(scores)),
            "best_epoch": result.best_epoch, "history": result.history, "train_seconds": result.train_seconds,
            "state": {k: _to_numpy(v) for k, v in result.probe.state_dict().items()}}


def _rebuild(plain: dict, variant: Variant, device: torch.device) -> FitResult:
    """A task's plain result as the FitResult the local sweep would have made (probe on ``device``, eval mode)."""
    if plain["variant"] != variant:
        raise TrainError(f"a dask task returned {plain['variant'].label} for {variant.label}: a stale worker? restart "
                         f"the cluster")
    with torch.device("meta"):  # no throw-away random init: every tensor comes from the worker
        probe = build_probe(variant.probe)
    tensors = {k: _from_numpy(a, dtype, device) for k, (a, dtype) in plain["state"].items()}
    probe.load_state_dict(tensors, strict=True, assign=True)
    return FitResult(variant=variant, probe=probe.eval(), threshold=plain["threshold"],
                     validation=plain["validation"], validation_scores=plain["validation_scores"],
                     best_epoch=plain["best_epoch"], history=plain["history"],
                     train_seconds=plain["train_seconds"])


def fit_share(store_ref: str, variants: Sequence[Variant], splits: Splits, metric: str, layers: Layers,
              device: str, buffer_tokens: int, data_seed: int, threads: int,
              decoded_cache: tuple[str, int] | None = None) -> dict:
    """One dask task: open the store, fit this share of the variants as the local sweep would, return plain values.

    ``threads``: the driver's torch intra-op thread count, used for this task so that CPU kernels sum in the
    driver's order (a dask worker starts with its own count, often 1). ``decoded_cache``: the driver's
    (folder, limit), opened on the worker's host (store/decoded_cache.py).
    """
    from probecache.store.decoded_cache import DecodedCache
    from probecache.store.reader import open_store

    started = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        store = open_store(store_ref, decoded_cache=DecodedCache(*decoded_cache) if decoded_cache else None)
        fitted = fit_groups(store, variants, splits, metric, layers, device, buffer_tokens, data_seed,
                            progress=False)
    finally:
        torch.set_num_threads(before)
    return {"results": [_plain(fitted[v]) for v in variants], "pid": os.getpid(),
            "seconds": time.perf_counter() - started}


# ---- the driver side --------------------------------------------------------------------------------------


def fit_on_dask(store, variants: Sequence[Variant], splits: Splits, metric: str, layers: Layers = None,
                device: torch.device | str = "cpu", buffer_tokens: int = 65536, data_seed: int = 0,
                workers: int = 2, scheduler: str | None = None, progress: bool = True,
                slurm: SlurmResources = SlurmResources()) -> dict[Variant, FitResult]:
    """Fit ``variants`` in ``workers`` shares on a dask cluster (a LocalCluster; ``scheduler`` "slurm": SLURM jobs
    asking for ``slurm``; else a running scheduler's address); results by variant, as :func:`fit_groups` gives."""
    shares = partition(variants, workers)
    device = torch.device(device)
    store_ref = store.url or str(store.path.resolve())  # each task opens the store itself
    threads = torch.get_num_threads()
    decoded_cache = store.decoded_cache.spec if store.decoded_cache is not None else None
    sweep_id = uuid.uuid4().hex[:12]  # task keys unique per sweep: two sweeps may share a scheduler
    client, cluster = dask_client(workers, scheduler, TrainError, DASK_MISSING, slurm)
    fitted: dict[Variant, FitResult] = {}
    try:
        from dask.distributed import as_completed

        futures = {client.submit(fit_share, store_ref, share, splits, metric, layers, str(device), buffer_tokens,
                                 data_seed, threads, decoded_cache, key=f"probecache-sweep-{sweep_id}-share-{i}",
                                 retries=2, pure=False): i for i, share in enumerate(shares)}
        for future in as_completed(futures):
            done = future.result()
            share = shares[futures[future]]
            for variant, plain in zip(share, done["results"], strict=True):
                fitted[variant] = _rebuild(plain, variant, device)
            if progress:
                print(f"sweep share {futures[future] + 1}/{len(shares)} fitted: {len(done['results'])} variant(s) "
                      f"in {done['seconds']:.1f} s (worker pid {done['pid']})", file=sys.stderr)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return fitted
