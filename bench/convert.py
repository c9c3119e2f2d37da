"""`store convert` speed next to extraction: the same small store extracted at a tier directly and converted
from its lossless store, alternating, best of ``--repeats`` each. Prints one line per tier and the ratio.

    python bench/convert.py                       # 300 Rotten Tomatoes reviews, SmolLM2-135M, bf16, CPU
    python bench/convert.py --tiers int7,fp8-e4m3 --limit 1000
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from probecache.extract.config import ExtractConfig  # noqa: E402
from probecache.extract.run import extract  # noqa: E402
from probecache.store.convert import convert_store  # noqa: E402
from probecache.store.reader import open_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="rotten_tomatoes")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--tiers", default="int7,fp8-e4m3,mantissa-4")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="convert-"))
    base = dict(dataset=args.dataset, limit=args.limit, model=args.model, dtype="bf16", device="cpu", progress=False)
    try:
        # warm-up: the first extraction in a process pays one-off costs (imports, allocator, page cache)
        extract(ExtractConfig(**{**base, "limit": min(args.limit, 64)}, root=str(root / "warm-up")))
        source = extract(ExtractConfig(**base, root=str(root / "lossless"))).store_path
        n_tokens = open_store(source).summary()["n_tokens"]
        print(f"{args.dataset}, {args.model}, {args.limit} examples, {n_tokens} tokens; best of {args.repeats}")
        for tier in args.tiers.split(","):
            best = {"extract": float("inf"), "convert": float("inf")}
            for again in range(args.repeats):
                for kind in ("extract", "convert") if again % 2 == 0 else ("convert", "extract"):
                    out = root / f"{kind}-{again}"
                    started = time.perf_counter()
                    if kind == "extract":
                        path = extract(ExtractConfig(**base, root=str(out), tier=tier)).store_path
                    else:
                        path = convert_store(source, out, tier)
                    best[kind] = min(best[kind], time.perf_counter() - started)
                    shutil.rmtree(path)
            print(f"{tier}: extract {best['extract']:.2f} s, convert {best['convert']:.2f} s, "
                  f"convert / extract {best['convert'] / best['extract']:.3f} "
                  f"({n_tokens / best['convert']:,.0f} tokens/s converted)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
