"""Training benchmark: how fast the loaders feed probes, and what sharing reads across a sweep saves.

Printed as ratios measured side by side in one run on the same store (absolute seconds on shared 2-core
machines are noisy; ratios of interleaved repeats are not):

  1. loader throughput relative to raw decompression: tokens/s of the training token stream (seeded segment
     order, shuffle buffer, padded bf16 batches of 32) over tokens/s of just decoding the same segments'
     ``hidden`` arrays (zarr read of the split's token range, all layers, nothing else). 1.0 = the loader
     adds nothing on top of decompression. Side by side: the serial reader (``prefetch=0``: reads on the
     consuming thread), the prefetching reader 1 and 2 segments ahead on cores - 1 threads
     (training's default is 1 ahead) and 2 ahead on 2 threads.
  2. read-time verification: loader tokens/s through the normal reader (every file checked against its
     commit record before use, store/verified.py) over tokens/s of the same loader reading the files
     unchecked (as readers did before). 1.0 = the check is free; the target is >= 0.95.
  3. K variants in one shared pass relative to K separate runs: wall time of ``fit_shared`` on K variants
     (each batch read once) over the summed wall time of K single-variant runs, same epochs and batches.
     < 1 is the saving; it is largest for probes whose compute is small next to the reads (pooling,
     scoring) and smallest for MHA, whose compute dominates.

    python bench/train.py                        # the store of the last `make extract` (.last-store)
    python bench/train.py --store STORE --quick  # 1 repeat, fewer variants
    python bench/train.py --store STORE --loader-only --repeats 5   # section 1 only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from common import evict_from_page_cache  # noqa: E402  (bench/common.py)
from probecache.store.reader import Store, open_store  # noqa: E402
from probecache.train.data import batch_source, labels_of, resolve_splits  # noqa: E402
from probecache.train.loaders import TokenStream  # noqa: E402
from probecache.train.probes import ProbeConfig  # noqa: E402
from probecache.train.sweep import auto_heads  # noqa: E402
from probecache.train.trainer import TrainConfig, Variant, fit_shared  # noqa: E402


def raw_decode_seconds(store, split: str, layers=None) -> tuple[float, int]:
    """Decode the split's token range of every segment's hidden array (``layers``: those only); nothing else."""
    table = store.manifest(split=split, columns=["segment", "token_offset", "n_tokens"])
    ranges: dict[str, list[int]] = {}
    for seg, off, n in zip(*(table[c].to_pylist() for c in ("segment", "token_offset", "n_tokens")), strict=True):
        lo_hi = ranges.setdefault(seg, [off, off + n])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], off), max(lo_hi[1], off + n)
    started = time.perf_counter()
    tokens = 0
    for seg, (lo, hi) in ranges.items():
        block = store.read_tokens(seg, lo, hi, layers, decode=False)  # (L', hi - lo, d)
        tokens += block.shape[1]
    return time.perf_counter() - started, tokens


class UncheckedStore(Store):
    """The same store with segment files read as they are, not checked against their commit records: what
    every reader did before read-time verification. Only here, to price the check."""

    def _segment_store(self, segment, files):
        from zarr.storage import LocalStore

        return LocalStore(self.layout.segment(segment), read_only=True)


def loader_seconds(store, splits, epoch: int, prefetch: int | None = None,
                   threads: int | None = None) -> tuple[float, int]:
    """One epoch of the scoring probe's token batches; ``prefetch`` None: as training builds them."""
    if prefetch is None:
        probe = ProbeConfig("scoring", store.n_layers, store.hidden_size, len(store.label_names))
        source = batch_source(store, splits.train, probe, None, 32, True, seed=0)
    else:  # the same stream as TokenBatches builds, with the reader chosen here
        source = TokenStream(store, splits.train.split, batch_size=32, shuffle=True, seed=0, dtype=None,
                             ids=splits.train.ids, prefetch=prefetch, prefetch_threads=threads)
    started = time.perf_counter()
    tokens = sum(int(b.mask.sum()) for b in source.epoch(epoch))
    return time.perf_counter() - started, tokens


def fit_seconds(store, splits, variants, class_counts, epochs: int) -> float:
    first = variants[0].probe
    train = batch_source(store, splits.train, first, None, 32, True, seed=0)
    val = batch_source(store, splits.validation, first, None, 32, False, seed=0)
    started = time.perf_counter()
    fit_shared(variants, train, val, "accuracy", class_counts, progress=False)
    return time.perf_counter() - started


def variants_for(store, probe: str, k: int, epochs: int, norm: str = "rms") -> list[Variant]:
    d, n = store.hidden_size, store.n_layers
    downcast = 32
    heads = auto_heads(d // downcast)
    lrs = [1e-3, 3e-3, 1e-2, 3e-4, 1e-4, 3e-2, 3e-5, 1e-5][:k]
    return [Variant(ProbeConfig(probe, n, d, len(store.label_names), downcast=downcast, heads=heads, norm=norm),
                    TrainConfig(lr=lr, epochs=epochs, patience=epochs, seed=0)) for lr in lrs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="store folder [default: the one in .last-store]")
    parser.add_argument("--quick", action="store_true", help="1 repeat, K = 2, 1 epoch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="variants per shared pass")
    parser.add_argument("--loader-only", action="store_true", help="section 1 only")
    parser.add_argument("--cold", action="store_true",
                        help="section 1 reads from disk: the store's files leave the page cache before each run")
    args = parser.parse_args()
    path = args.store or (Path(".last-store").read_text().strip() if Path(".last-store").exists() else None)
    if not path:  # nothing extracted yet: the make extract default store (about a minute)
        from probecache.extract.config import ExtractConfig
        from probecache.extract.run import extract

        path = extract(ExtractConfig(limit=2000, progress=False)).store_path
    store = open_store(path)
    repeats, k, epochs = (1, 2, 1) if args.quick else (args.repeats, args.k, 1)
    splits = resolve_splits(store)
    counts = np.bincount(labels_of(store, splits.train), minlength=len(store.label_names))
    print(f"store {store.store_id}: {store.summary()['n_examples']} examples, {store.n_layers} layers x "
          f"d={store.hidden_size}, {repeats} interleaved repeat(s)")

    readers = {"serial (prefetch=0)": (0, None), "prefetch 1 ahead, default threads": (1, None),
               "prefetch 2 ahead, default threads": (2, None), "prefetch 2 ahead, 2 threads": (2, 2)}
    raw_rates: list[float] = []
    rates: dict[str, list[float]] = {name: [] for name in readers}
    for r in range(repeats):  # interleaved, the starting point rotating: raw and each reader on the same epoch
        runs = ["raw", *readers]
        for name in runs[r % len(runs):] + runs[: r % len(runs)]:
            if args.cold:
                evict_from_page_cache(Path(store.path) / "segments")
            if name == "raw":
                raw_s, raw_tokens = raw_decode_seconds(store, splits.train.split)
                raw_rates.append(raw_tokens / raw_s)
            else:
                load_s, load_tokens = loader_seconds(store, splits, epoch=r, prefetch=readers[name][0],
                                                     threads=readers[name][1])
                rates[name].append(load_tokens / load_s)
    ratios = {name: [a / b for a, b in zip(rates[name], raw_rates, strict=True)] for name in readers}
    bytes_per_token = store.n_layers * store.hidden_size * 2
    print(f"\n1. loader vs raw decompression (train split, all layers, {len(store.segments(splits.train.split))} "
          f"segments, {os.cpu_count()} cores, {'from disk' if args.cold else 'page cache warm'})")
    print(f"   raw decode  {statistics.median(raw_rates):>10,.0f} tok/s "
          f"({statistics.median(raw_rates) * bytes_per_token / 1e6:,.0f} MB/s of bf16 activations)")
    for name in readers:
        print(f"   {name:<34}{statistics.median(rates[name]):>10,.0f} tok/s, ratio loader / raw "
              f"{statistics.median(ratios[name]):.3f} (repeats: {', '.join(f'{x:.3f}' for x in ratios[name])})")
    serial = rates["serial (prefetch=0)"]
    for name in list(readers)[1:]:
        over = [a / b for a, b in zip(rates[name], serial, strict=True)]
        print(f"   {name} / serial: {statistics.median(over):.3f} (repeats: {', '.join(f'{x:.3f}' for x in over)})")
    if args.loader_only:
        return

    checked_ratio = []
    unchecked = UncheckedStore(store.path)
    for r in range(max(repeats, 3)):  # interleaved, each side on a fresh reader (no warm in-process cache)
        fresh = open_store(store.path)
        checked_s, checked_tokens = loader_seconds(fresh, splits, epoch=r)
        plain_s, plain_tokens = loader_seconds(unchecked, splits, epoch=r)
        unchecked = UncheckedStore(store.path)
        checked_ratio.append((checked_tokens / checked_s) / (plain_tokens / plain_s))
    print("\n2. read-time verification (train split, all layers)")
    print(f"   loader checked / unchecked: {statistics.median(checked_ratio):.3f} "
          f"(repeats: {', '.join(f'{x:.3f}' for x in checked_ratio)})")

    print(f"\n3. {k} variants in one shared pass vs {k} separate runs ({epochs} epoch(s) each)")
    # (mean pooling of raw states on the pooled tier is left out: it loads once into memory and fits in well
    # under a second, so there is no read to share and the ratio is timer noise)
    rows = [("pooling", "rms", "pooling (tokens)"), ("scoring", "rms", "scoring"), ("mha", "rms", "mha (downcast 32)")]
    for probe, norm, label in rows:
        variants = variants_for(store, probe, k, epochs, norm)
        shared_ratio = []
        for _ in range(repeats):
            shared = fit_seconds(store, splits, variants, counts, epochs)
            separate = sum(fit_seconds(store, splits, [v], counts, epochs) for v in variants)
            shared_ratio.append(shared / separate)
        print(f"   {label:<27} shared / separate = {statistics.median(shared_ratio):.3f} "
              f"(repeats: {', '.join(f'{x:.3f}' for x in shared_ratio)}; last: {shared:.1f} s vs {separate:.1f} s)")


if __name__ == "__main__":
    main()
