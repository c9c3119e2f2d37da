"""`make bench`: every CPU benchmark in one go, each in its own process, with its wall time at the end.

    python bench/all.py                   # the full suite (~30 min on 2 cores)
    python bench/all.py --quick           # every benchmark at smoke size (~5 min)
    python bench/all.py --only formats    # one or more of them (repeatable)

Each script prints its own tables (ratios measured side by side in that script's single run) and writes its
raw numbers to bench/out/<name>.json; docs/BENCHMARKS.md explains them. The quality table (bench/results.py,
bench/ood.py: hours of CPU) and the GPU benchmark (bench/gpu.py) are separate: `make results`, `make bench-gpu`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def suite(quick: bool, data_dir: str | None, store: str | None) -> list[tuple[str, list[str]]]:
    q = ["--quick"] if quick else []
    with_store = ["--store", store] if store else []
    jigsaw = ["--dataset", "rotten_tomatoes", "--dataset", "jigsaw", "--data-dir", data_dir] if data_dir else []
    return [
        ("extract", [*q, *jigsaw]),  # forward alone vs probecache writing: overhead, padding, compression
        ("formats", q),  # probecache's store vs torch.save / npz / HF datasets / HDF5 / padded arrays
        ("train", [*q, *with_store]),  # loader vs raw decompression; shared-read sweeps vs separate runs
        ("scaling", q),  # x1 / x4 / x16 examples; sequence length 64 .. 1024
        # serve: 2 repeats in quick mode (its own --quick has 3) keep the quick suite under 5 minutes
        ("serve", [*q, *(["--repeats", "2"] if quick else [])]),  # probe in the forward vs bare model vs guard
        ("remote", [*(["--shards", "1", "--examples", "50"] if quick else []), *with_store]),  # loopback S3
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every benchmark at smoke size")
    parser.add_argument("--data-dir", default=None, help="adds Jigsaw to the extraction benchmark")
    parser.add_argument("--store", default=None, help="store for train/remote [default: the last `make extract`]")
    parser.add_argument("--only", action="append", help="run only these benchmarks (repeatable)")
    args = parser.parse_args()
    plan = suite(args.quick, args.data_dir, args.store)
    unknown = set(args.only or ()) - {name for name, _ in plan}
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}: choose from "
                     f"{', '.join(name for name, _ in plan)}")
    timings = []
    for name, extra in plan:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(BENCH / f"{name}.py"), *extra]
        print(f"\n==== bench/{name}.py {' '.join(extra)}", flush=True)
        started = time.perf_counter()
        code = subprocess.call(cmd)
        timings.append((name, time.perf_counter() - started, code))
        if code != 0:
            break  # a failed benchmark's numbers are missing: stop rather than print a partial suite as done
    total = sum(s for _, s, _ in timings)
    print("\n| benchmark | wall time | exit |\n|---|---|---|")
    for name, seconds, code in timings:
        print(f"| {name} | {seconds / 60:.1f} min | {code} |")
    print(f"| **all** | **{total / 60:.1f} min** | |")
    failed = [name for name, _, code in timings if code != 0]
    if failed:
        sys.exit(f"bench/{failed[0]}.py failed: its output above says why")


if __name__ == "__main__":
    main()
