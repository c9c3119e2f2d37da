"""Capture subsets side by side (extract --layers / --tokens): bytes kept, extraction time, and what a probe loses.

For one dataset slice and the embedded model, extract the full store and each subset store in the same run (same
plan and batches), then report per store: stored MB, bytes per prompt token (hidden only), the ratio to the full
store, the extraction time ratio (best of --repeats, stores visited in turn), and the test metric of a scoring
probe (3 seeds, mean +- std) on the probe layers, next to the full store's with ``train --layers`` on the same
layers. A layer subset holds the full store's values of those layers, so its metrics must equal the full store's
exactly; a token subset trains the probe on fewer tokens (the pooled means stay over every token).

    python bench/subsets.py --quick        # ~6 min on 2 cores: 300 RT reviews, 3 epochs
    python bench/subsets.py                # 1000 RT reviews, 10 epochs

Stores go to a temporary root deleted at the end.
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

from probecache.extract.config import ExtractConfig  # noqa: E402
from probecache.extract.run import extract  # noqa: E402
from probecache.store.reader import open_store  # noqa: E402
from probecache.train.runner import TrainOptions, train_run  # noqa: E402
from probecache.train.sweep import Grid  # noqa: E402

PROBE_LAYERS = [8, 16, 24]
VARIANTS = {  # name -> ExtractConfig overrides
    "full": {},
    "layers 8,16,24": {"layers": "8,16,24"},
    "layers 0-4,20,-1": {"layers": "0-4,20,-1"},
    "tokens last-16": {"tokens": "last-16"},
    "tokens every-4": {"tokens": "every-4"},
    "tokens last": {"tokens": "last"},
}


def hidden_bytes(store) -> int:
    return sum(size for segment in store.segments()
               for rel, (size, _) in (store.segment_files(segment) or {}).items() if rel.startswith("hidden"))


def scoring_metric(store, layers: list[int], epochs: int, runs: Path) -> tuple[float, float] | None:
    if store.token_policy.name == "last":
        return None  # train refuses token probes on a last-token store (tested); nothing to measure
    values = []
    for seed in (0, 1, 2):
        grid = Grid("scoring", epochs=epochs, seeds=(seed,))
        run = train_run(store, TrainOptions(probe="scoring", grid=grid, layers=layers, runs_dir=str(runs),
                                            progress=False))
        metrics = json.loads((run / "metrics.json").read_text())
        values.append(metrics["test"][metrics["metric"]])
    return statistics.mean(values), statistics.stdev(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="extraction timing passes (best of)")
    args = ap.parse_args()
    limit = args.limit or (300 if args.quick else 1000)
    epochs = args.epochs or (3 if args.quick else 10)
    tmp = Path(tempfile.mkdtemp(prefix="probecache-subsets-"))
    try:
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        stores = {}
        for attempt in range(args.repeats):
            for name, overrides in VARIANTS.items():
                root = tmp / f"pass{attempt}"
                config = ExtractConfig(dataset="rotten_tomatoes", limit=limit, root=str(root), progress=False,
                                       **overrides)
                started = time.perf_counter()
                result = extract(config)
                seconds[name].append(time.perf_counter() - started)
                stores[name] = open_store(result.store_path)
        full = stores["full"]
        prompt_tokens = int(full.summary()["n_tokens"])
        base_bytes, base_seconds = hidden_bytes(full), min(seconds["full"])
        print(f"rotten_tomatoes, {limit} reviews, {prompt_tokens} prompt tokens, SmolLM2-135M; scoring probe on layers "
              f"{PROBE_LAYERS}, {epochs} epochs, seeds 0-2; extraction best of {args.repeats}")
        print(f"{'store':<18} {'stored MB':>9} {'B/prompt token':>14} {'x fewer':>8} {'extract':>8}  scoring test")
        for name, store in stores.items():
            size = hidden_bytes(store)
            layers = [layer for layer in PROBE_LAYERS if layer in store.stored_layers] or store.stored_layers
            metric = scoring_metric(store, layers, epochs, tmp / "runs")
            shown = "refused (last token only)" if metric is None else f"{metric[0]:.3f} +- {metric[1]:.3f}"
            print(f"{name:<18} {size / 1e6:9.1f} {size / prompt_tokens:14,.0f} {base_bytes / size:8.2f} "
                  f"{min(seconds[name]) / base_seconds:8.2f}  {shown}  (layers {layers})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
