"""Extraction benchmark: what writing every hidden state costs on top of the forward passes.

Measured side by side in one run, on the same model, data and batches (absolute seconds on shared 2-core
machines are noisy; ratios of interleaved runs are not):
  - overhead ratio: extraction loop time (forward + capture + compression + writes + commits) over the
    bare forward passes of the very same batches (`base_model(..., output_hidden_states=True)`);
  - padding fraction of processed tokens (length-bucketed batches);
  - compression ratio of the stored activations, and bytes per stored value.

Like the `probecache` CLI, this process runs with OMP_WAIT_POLICY=PASSIVE (see probecache/cli.py). That
policy makes the bare forward itself a little slower, so each repeat also times the bare forward in a child
process with the OpenMP default (spinning) policy, and the overhead is reported against the faster of the
two bare forwards as well: no flattering baseline.

    python bench/extract.py                         # rotten_tomatoes (embedded), 2,000 examples
    python bench/extract.py --quick                 # 400 examples, 1 repeat
    python bench/extract.py --dataset jigsaw --data-dir ../shared/data
"""

from __future__ import annotations

import os
import sys

if "--bare-only" not in sys.argv:  # must precede torch's OpenMP start-up, as in the CLI
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import bare_forward_seconds, prepare  # noqa: E402  (bench/common.py; bench/ is on sys.path)
from probecache.extract.run import extract  # noqa: E402


def bare_in_child(args: argparse.Namespace, dataset: str, limit: int) -> float:
    """The bare forward under OpenMP's default (spinning) wait policy, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    cmd = [sys.executable, __file__, "--bare-only", "--dataset", dataset, "--limit", str(limit),
           "--model", args.model, "--dtype", args.dtype]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["bare_s"]


def run(args: argparse.Namespace, dataset: str, limit: int, repeats: int, scratch: Path) -> dict:
    config, model, all_batches, pad_id, device = prepare(dataset, args.data_dir, limit, args.model, args.dtype,
                                                         scratch / "stores")
    bare_times, child_times, loop_times, ratios = [], [], [], []
    result = None
    for r in range(repeats):
        order = ("bare", "extract", "child") if r % 2 == 0 else ("child", "extract", "bare")  # against drift
        for what in order:
            if what == "bare":
                bare_times.append(bare_forward_seconds(model, all_batches, pad_id))
            elif what == "child":
                child_times.append(bare_in_child(args, dataset, limit))
            else:
                shutil.rmtree(scratch / "stores", ignore_errors=True)
                result = extract(replace(config, root=str(scratch / "stores")))
                loop_times.append(result.loop_seconds)
        ratios.append(loop_times[-1] / bare_times[-1])
    t = result.totals
    n_values = t.tokens * (model.config.num_hidden_layers + 1) * model.config.hidden_size
    shutil.rmtree(scratch / "stores", ignore_errors=True)
    loop, bare, child = (statistics.median(x) for x in (loop_times, bare_times, child_times))
    return {
        "dataset": dataset, "model": args.model, "dtype": args.dtype, "device": device,
        "examples": t.examples, "tokens": t.tokens, "batches": len(all_batches),
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "bare_forward_s": bare_times, "bare_forward_default_omp_s": child_times, "extract_loop_s": loop_times,
        "overhead_ratio": statistics.median(ratios), "overhead_ratios": ratios,
        "overhead_vs_fastest_bare": loop / min(bare, child),
        "bare_tokens_per_s": t.tokens / bare, "bare_default_omp_tokens_per_s": t.tokens / child,
        "extract_tokens_per_s": t.tokens / loop,
        "padding_fraction": 1 - t.tokens / t.padded_tokens,
        "compression_ratio": t.hidden_bytes_raw / t.hidden_bytes_stored,
        "compression_ratio_all_arrays": t.bytes_raw / t.bytes_stored,
        "bytes_per_value": t.hidden_bytes_stored / n_values,
        "kib_per_token_stored": t.bytes_stored / t.tokens / 1024,
    }


def table(results: list[dict]) -> str:
    rows = [
        ("examples / tokens", lambda r: f"{r['examples']:,} / {r['tokens']:,}"),
        ("bare forward tok/s (passive OpenMP)", lambda r: f"{r['bare_tokens_per_s']:,.0f}"),
        ("bare forward tok/s (default OpenMP)", lambda r: f"{r['bare_default_omp_tokens_per_s']:,.0f}"),
        ("extraction tok/s", lambda r: f"{r['extract_tokens_per_s']:,.0f}"),
        ("overhead ratio, same process (<= 1.15)", lambda r: f"{r['overhead_ratio']:.3f}  ("
                                                             f"{', '.join(f'{x:.3f}' for x in r['overhead_ratios'])})"),
        ("overhead ratio vs fastest bare forward", lambda r: f"{r['overhead_vs_fastest_bare']:.3f}"),
        ("padding of processed tokens (<= 10%)", lambda r: f"{r['padding_fraction']:.1%}"),
        ("compression, activations (>= 1.4x)", lambda r: f"{r['compression_ratio']:.3f}x"),
        ("compression, all arrays", lambda r: f"{r['compression_ratio_all_arrays']:.3f}x"),
        ("bytes per stored bf16 value", lambda r: f"{r['bytes_per_value']:.3f}"),
        ("KiB on disk per token (all arrays)", lambda r: f"{r['kib_per_token_stored']:.1f}"),
    ]
    header = "| metric | " + " | ".join(r["dataset"] for r in results) + " |"
    lines = [header, "|---" * (len(results) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(r) for r in results) + " |" for name, fmt in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", help="repeatable; default rotten_tomatoes")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=None, help="examples per dataset (default 2000)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help="400 examples, 1 repeat")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    limit = args.limit or (400 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    datasets = args.dataset or ["rotten_tomatoes"]
    if args.bare_only:
        with tempfile.TemporaryDirectory() as scratch:
            _, model, all_batches, pad_id, _ = prepare(datasets[0], args.data_dir, limit, args.model, args.dtype,
                                                       Path(scratch))
            print(json.dumps({"bare_s": bare_forward_seconds(model, all_batches, pad_id)}))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="probecache-bench-") as scratch:
        for name in datasets:
            print(f"[bench] {name}: {limit} examples, {repeats} interleaved repeats ...", file=sys.stderr)
            results.append(run(args, name, limit, repeats, Path(scratch)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract.json").write_text(json.dumps(results, indent=1))
    print(f"extraction benchmark: {results[0]['model']} ({results[0]['dtype']}, {results[0]['device']}, "
          f"{results[0]['torch_threads']} torch threads, OMP_WAIT_POLICY={results[0]['omp_wait_policy']})")
    print(table(results))


if __name__ == "__main__":
    main()
