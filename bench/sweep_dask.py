"""A sweep's fitting phase in this process vs on a 2-worker dask LocalCluster (``train --executor dask``).

Side by side in one run on one store, alternating, median of ``--repeats``: the wall time of fitting K variants
locally (:func:`~probecache.train.groups.fit_groups`) and through dask (:func:`~probecache.train.distributed.
fit_on_dask` on a cluster started once; its start-up is printed apart, since a sweep on a long-lived cluster
does not pay it). Ratio dask / local < 1 is the gain. Every repeat also checks that both gave the same
validation metrics for every variant (the dask executor's promise).

Two thread settings, because every dask task runs torch with the driver's thread count (bit-identical results):
the default (torch's count here, so each of the 2 workers uses as many threads as the local run: on a 2-core
machine that oversubscribes), and 1 thread per process (local on 1 thread vs 2 workers x 1 thread: the fair
scale-out comparison on a small machine).

    python bench/sweep_dask.py                      # the store of the last `make extract`, else 300 reviews
    python bench/sweep_dask.py --store STORE --k 8 --epochs 2 --repeats 3
    python bench/sweep_dask.py --quick              # 4 variants, 1 epoch, 1 repeat
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from probecache.store.reader import open_store  # noqa: E402
from probecache.train.data import resolve_splits  # noqa: E402
from probecache.train.distributed import fit_on_dask  # noqa: E402
from probecache.train.groups import fit_groups  # noqa: E402
from probecache.train.sweep import Grid, expand_grid  # noqa: E402

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
OUT = Path(__file__).resolve().parent / "out"


def the_store(arg: str | None, limit: int, folder: Path):
    """--store, else the last `make extract`'s store, else a fresh extraction of ``limit`` reviews (SmolLM2)."""
    last = Path(".last-store")
    if arg or last.is_file():
        return open_store(arg or last.read_text().strip())
    from probecache.extract.config import ExtractConfig
    from probecache.extract.run import extract

    config = ExtractConfig(dataset="rotten_tomatoes", limit=limit, model="smollm2-135m", dtype="bf16", device="cpu",
                           progress=False, root=str(folder))
    return open_store(extract(config).store_path)


def variants_for(store, probe: str, k: int, epochs: int, batch_sizes: tuple[int, ...]):
    """K variants: learning rates x 2 seeds x ``batch_sizes`` (one shared-read group per batch size)."""
    seeds = 2 if k >= 2 * len(batch_sizes) else 1
    lrs = LRS[: max(1, k // (seeds * len(batch_sizes)))]
    grid = Grid(probe, lrs=lrs, seeds=tuple(range(seeds)), batch_sizes=batch_sizes, epochs=epochs, patience=epochs)
    return expand_grid(grid, store.n_layers, store.hidden_size, len(store.label_names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--limit", type=int, default=300, help="reviews to extract when there is no store")
    ap.add_argument("--probe", default="scoring")
    ap.add_argument("--k", type=int, default=8, help="variants (learning rates x 2 seeds [x 2 batch sizes])")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.k, args.epochs, args.repeats = 4, 1, 1
    from dask.distributed import LocalCluster

    folder = Path(tempfile.mkdtemp(prefix="sweep-dask-"))
    try:
        store = the_store(args.store, args.limit, folder)
        splits = resolve_splits(store)
        # one group (batch size 32): the group's variants are split, so each worker reads all of the batches;
        # two groups (16 and 32): one whole group per worker, every batch read once as locally
        scenarios = {"one group (variants split, reads repeated per worker)": (32,),
                     "two groups (a whole group per worker)": (16, 32)}
        n_tokens = store.summary()["n_tokens"]
        print(f"{store.store_id}: {n_tokens} tokens, {store.n_layers} layers x d={store.hidden_size}; {args.k} "
              f"{args.probe} variants, {args.epochs} epoch(s); {os.cpu_count()} cores; median of {args.repeats}")
        started = time.perf_counter()
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None)
        startup = time.perf_counter() - started
        print(f"LocalCluster of {args.workers} worker processes started in {startup:.1f} s (not counted below)")
        default_threads = torch.get_num_threads()
        record = {"store": store.store_id, "variants": args.k, "epochs": args.epochs, "workers": args.workers,
                  "cluster_start_s": startup, "settings": {}}
        try:
            # warm-up: the first task on each worker imports torch and the train stage (not part of a sweep's cost
            # on a long-lived cluster); the first local fit warms the page cache and the allocator
            warm = variants_for(store, args.probe, args.workers, 1, (32,))
            fit_on_dask(store, warm, splits, "accuracy", scheduler=cluster.scheduler_address, workers=args.workers,
                        progress=False)
            fit_groups(store, warm[:1], splits, "accuracy", progress=False)
            for (scenario, batch_sizes), threads in itertools.product(scenarios.items(),
                                                                      dict.fromkeys((default_threads, 1))):
                variants = variants_for(store, args.probe, args.k, args.epochs, batch_sizes)
                torch.set_num_threads(threads)
                local_s, dask_s = [], []
                for r in range(args.repeats):
                    for kind in ("local", "dask") if r % 2 == 0 else ("dask", "local"):
                        t0 = time.perf_counter()
                        if kind == "local":
                            # a fresh Store, as each dask task opens: both sides verify the files they read once
                            local = fit_groups(open_store(store.url or store.path), variants, splits, "accuracy",
                                               progress=False)
                            local_s.append(time.perf_counter() - t0)
                        else:
                            remote = fit_on_dask(store, variants, splits, "accuracy", workers=args.workers,
                                                 scheduler=cluster.scheduler_address, progress=False)
                            dask_s.append(time.perf_counter() - t0)
                    same = all(local[v].validation == remote[v].validation for v in variants)
                    if not same:
                        raise SystemExit("dask and local fits differ: the executor's promise is broken")
                ratios = [d / s for d, s in zip(dask_s, local_s, strict=True)]
                print(f"{scenario}, {len(variants)} variants, {threads} torch thread(s) per process: local "
                      f"{statistics.median(local_s):.1f} s, dask "
                      f"({args.workers} workers) {statistics.median(dask_s):.1f} s, dask / local "
                      f"{statistics.median(ratios):.3f} (repeats: {', '.join(f'{x:.3f}' for x in ratios)}); "
                      f"identical validation metrics: yes", flush=True)
                record["settings"][f"{scenario}, {threads} thread(s)"] = {"local_s": local_s, "dask_s": dask_s,
                                                                            "ratios": ratios}
            torch.set_num_threads(default_threads)
        finally:
            cluster.close()
        OUT.mkdir(exist_ok=True)
        (OUT / "sweep_dask.json").write_text(json.dumps(record, indent=1))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
