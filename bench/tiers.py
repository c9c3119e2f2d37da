"""Storage tiers side by side (store/tiers.py): what each lossy tier saves and what it costs the probes.

For each tier, on the same dataset slice, model, plan and batches as a lossless store extracted in the same run:

  1. bytes per token on disk: ``hidden`` (+ ``hidden_scale``) files over tokens, all layers; and the whole
     segment (mean, last included), and the ratio to lossless;
  2. reconstruction error against the lossless values: per layer relative RMS (||x^ - x|| / ||x||) and max
     |x^ - x|, summarised as median / max over layers; and the mean per-token relative error (||x^_t - x_t|| /
     ||x_t||), which the massive-activation tokens do not dominate;
  3. extract overhead: extraction wall time over lossless's (same process, after a warm-up extraction, model
     loaded once per extract as the CLI does; best of --timing-repeats passes in alternating tier order);
  4. loader throughput: tokens/s of one TokenStream epoch over the train split (the probes' layers) over
     lossless's, best of 3 rounds visiting the tiers in turn;
  5. probe metrics: the test metric of ``scoring`` and ``mha`` (downcast 8) for seeds 0, 1, 2 (mean +- std),
     same splits and seeds as lossless (train API: train/runner.py train_run).

    python bench/tiers.py --quick                      # ~10 min on 2 cores: 300 RT reviews, 3 layers, 3 epochs
    python bench/tiers.py                              # 1000 RT reviews, 5 layers, 10 epochs
    python bench/tiers.py --dataset toxicchat          # needs ../shared/data/toxicchat (skipped when absent): the
                                                       # human train file carved 80/10/10, chat template, 128 tokens

Stores go to a temporary root that is deleted at the end (each SmolLM2 store is ~36 KB per token lossless).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from probecache.extract.config import ExtractConfig  # noqa: E402
from probecache.extract.run import extract  # noqa: E402
from probecache.store.reader import Store, open_store  # noqa: E402
from probecache.store.tiers import to_float32  # noqa: E402
from probecache.train.loaders import TokenStream  # noqa: E402
from probecache.train.runner import TrainOptions, train_run  # noqa: E402
from probecache.train.sweep import Grid  # noqa: E402

TIERS = ["lossless", "mantissa-4", "mantissa-2", "mantissa-0", "fp8-e4m3", "fp8-e5m2", "int8", "int7", "int6"]
QUICK_TIERS = ["lossless", "mantissa-2", "fp8-e4m3", "int8", "int7"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def hidden_bytes(store: Store) -> tuple[int, int]:
    """(bytes of hidden + hidden_scale files, bytes of every segment file) over the committed segments."""
    hidden = total = 0
    for segment in store.segments():
        for rel, (size, _) in (store.segment_files(segment) or {}).items():
            total += size
            hidden += size if rel.startswith("hidden") else 0
    return hidden, total


def reconstruction(exact: Store, lossy: Store) -> dict:
    """Errors of ``lossy`` against ``exact`` (same plan: segments pair up in shard order), layer by layer."""
    L = exact.n_layers
    err2, ref2, worst = np.zeros(L), np.zeros(L), np.zeros(L)
    token_rel = []
    for a, b in zip(exact.segments(), lossy.segments(), strict=True):
        for layer in range(L):
            x = to_float32(exact.read_tokens(a, layers=[layer], decode=False)[0], exact.logical_dtype)  # (T, d)
            y = to_float32(lossy.read_tokens(b, layers=[layer], decode=False)[0], lossy.logical_dtype)
            e = y - x
            err2[layer] += float((e.astype(np.float64) ** 2).sum())
            ref2[layer] += float((x.astype(np.float64) ** 2).sum())
            worst[layer] = max(worst[layer], float(np.abs(e).max()))
            token_rel.append(np.linalg.norm(e, axis=1) / np.maximum(np.linalg.norm(x, axis=1), 1e-12))
    rel = np.sqrt(err2 / np.maximum(ref2, 1e-30))
    return {"rel_rms_median": float(np.median(rel)), "rel_rms_max": float(rel.max()),
            "rel_rms_per_layer": [round(float(r), 5) for r in rel], "max_abs": float(worst.max()),
            "max_abs_per_layer": [float(w) for w in worst],
            "token_rel_mean": float(np.concatenate(token_rel).mean())}


def loader_tokens_per_second(stores: dict[str, Store], layers: list[int], repeats: int = 3) -> dict[str, float]:
    """Tokens/s of one TokenStream epoch per tier, best of ``repeats`` rounds that visit the tiers in turn: the
    machine's load drifts by +-20% from minute to minute, and the first pass over a store also pays one-off costs
    (zarr metadata, commit-record checks), which made the tier measured first look 2x slower."""
    streams = {tier: TokenStream(store, "train", layers=layers, batch_size=32, seed=0)
               for tier, store in stores.items()}
    best = dict.fromkeys(streams, float("inf"))
    tokens = {}
    for epoch in range(repeats):
        for tier, stream in streams.items():
            started = time.perf_counter()
            tokens[tier] = sum(int(b.mask.sum()) for b in stream.epoch(epoch))
            best[tier] = min(best[tier], time.perf_counter() - started)
    return {tier: tokens[tier] / best[tier] for tier in streams}


def probe_metrics(store: Store, probe: str, layers: list[int], epochs: int, runs: Path, metric: str | None) -> dict:
    grid = Grid(probe, downcasts=(8,), seeds=(0, 1, 2), epochs=epochs)
    run = train_run(store, TrainOptions(probe=probe, grid=grid, layers=layers, runs_dir=str(runs), progress=False,
                                        metric=metric))
    metrics = json.loads((run / "metrics.json").read_text())
    name = metrics["metric"]
    values = [s["test"][name] for s in metrics["seeds"]]
    return {"metric": name, "values": values, "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dataset", default="rotten_tomatoes")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--tiers", default=None, help="comma-separated tier names (lossless is always first)")
    ap.add_argument("--layers", default=None, help="probe layers, e.g. 4,8,16 (default: quick 8,16,24)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--epochs", type=int, default=None, help="probe epochs (default: quick 3, else 10)")
    ap.add_argument("--timing-repeats", type=int, default=2,
                    help="extractions per tier, in alternating order (best kept); later ones are deleted at once")
    ap.add_argument("--no-probes", action="store_true", help="bytes, errors, extract and loader ratios only")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    source = {"dataset": args.dataset, "data_dir": args.data_dir}
    metric = None  # the train default: accuracy for sentiment labels
    if args.dataset == "toxicchat":  # the carve of bench/results.py: the official test file is held back here
        csv = Path(args.data_dir or SHARED_DATA / "toxicchat") / "toxicchat0124_human_train.csv"
        if not csv.is_file():
            print(f"skipped: {csv} is absent (see ../shared/data/README.md)")
            return
        source = {"dataset": f"csv:{csv}", "text_col": "user_input", "label_col": "toxicity", "id_col": "conv_id",
                  "prompt_format": "chat", "max_tokens": 128}
        metric = "f1"
    limit = args.limit or (300 if args.quick else 1000)
    tiers = args.tiers.split(",") if args.tiers else (QUICK_TIERS if args.quick else TIERS)
    tiers = ["lossless", *[t for t in tiers if t != "lossless"]]
    layers = [int(v) for v in (args.layers or ("8,16,24" if args.quick else "4,8,12,16,24")).split(",")]
    epochs = args.epochs or (3 if args.quick else 10)
    root = Path(tempfile.mkdtemp(prefix="tiers-"))
    results: dict[str, dict] = {}
    try:
        stores: dict[str, Store] = {}
        # warm-up: the first extraction in a process pays one-off costs (imports, allocator, page cache) that
        # made lossless, always first, look slower than every lossy tier after it
        extract(ExtractConfig(**source, limit=min(limit, 64), model=args.model, dtype="bf16", device="cpu",
                              root=str(root / "warm-up"), progress=False))
        for tier in tiers:
            config = ExtractConfig(**source, limit=limit, model=args.model, dtype="bf16", device="cpu",
                                   root=str(root / "stores"), progress=False, tier=tier)
            started = time.perf_counter()
            stores[tier] = open_store(extract(config).store_path)
            seconds = time.perf_counter() - started
            summary = stores[tier].summary()
            hidden, total = hidden_bytes(stores[tier])
            results[tier] = {"extract_seconds": seconds, "n_tokens": summary["n_tokens"],
                             "hidden_bytes_per_token": hidden / summary["n_tokens"],
                             "segment_bytes_per_token": total / summary["n_tokens"]}
            print(f"{tier}: extracted in {seconds:.1f} s, {hidden / summary['n_tokens']:,.0f} B/token hidden",
                  flush=True)
        for again in range(1, args.timing_repeats):  # the same extractions in the other order: best time kept
            for tier in tiers if again % 2 == 0 else tiers[::-1]:
                config = ExtractConfig(**source, limit=limit, model=args.model, dtype="bf16", device="cpu",
                                       root=str(root / f"again-{again}"), progress=False, tier=tier)
                started = time.perf_counter()
                path = extract(config).store_path
                results[tier]["extract_seconds"] = min(results[tier]["extract_seconds"], time.perf_counter() - started)
                shutil.rmtree(path)
        loader = loader_tokens_per_second(stores, layers)
        base = results["lossless"]
        for tier in tiers:
            r = results[tier]
            r["bytes_ratio_vs_lossless"] = base["hidden_bytes_per_token"] / r["hidden_bytes_per_token"]
            r["extract_overhead"] = r["extract_seconds"] / base["extract_seconds"]
            if tier != "lossless":
                r["error"] = reconstruction(stores["lossless"], stores[tier])
            r["loader_tokens_per_s"] = loader[tier]
            r["loader_ratio"] = loader[tier] / loader["lossless"]
            for probe in () if args.no_probes else ("scoring", "mha"):
                r[probe] = probe_metrics(stores[tier], probe, layers, epochs, root / "runs", metric)
            print(json.dumps({tier: {k: v for k, v in r.items() if k != "error"}}, default=float), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # stores are large: never leave them behind
    print_table(results, args, limit, layers, epochs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


def print_table(results: dict, args, limit: int, layers: list[int], epochs: int) -> None:
    print(f"\n{args.dataset}, {args.model}, {limit} examples, probe layers {layers}, {epochs} epochs, seeds 0-2")
    head = ("tier", "B/token", "vs lossless", "relRMS med/max", "tok rel", "max abs", "extract", "loader",
            "scoring", "mha/8")
    print(" | ".join(head))
    for tier, r in results.items():
        e = r.get("error")
        err = ("0", "0", "0") if e is None else (f"{e['rel_rms_median']:.4f}/{e['rel_rms_max']:.4f}",
                                                 f"{e['token_rel_mean']:.4f}", f"{e['max_abs']:.3g}")
        probes = [f"{r[p]['mean']:.4f} ± {r[p]['std']:.4f}" if p in r else "-" for p in ("scoring", "mha")]
        print(" | ".join([tier, f"{r['hidden_bytes_per_token']:,.0f}", f"{r['bytes_ratio_vs_lossless']:.2f}x", *err,
                          f"{r['extract_overhead']:.2f}x", f"{r['loader_ratio']:.2f}x", *probes]))


if __name__ == "__main__":
    main()
