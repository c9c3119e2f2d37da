"""probecache's store vs the storage formats users would otherwise pick, on the same activations.

Formats (bench/baseline_formats.py): one ``torch.save`` file per example (bf16), one ``.npz`` per example
(``savez_compressed``, fp16), an HF ``datasets`` Arrow table with one fixed-shape row per token (fp16; SAELens),
one HDF5 file with a flat token axis and offsets (fp16, h5py defaults; probelab), and one dense padded .npy
(N, L+1, T_max, d) fp16. Everything is measured side by side in one process, in an order rotated across
repeats (absolute seconds on shared 2-core machines drift; ratios of interleaved runs do not):

1. extraction: the forward passes of the exact batches the extractor runs, bare vs with probecache writing
   (``extract()``, its loop time) vs with each baseline writer (a user's loop: forward, stack, write);
   the overhead ratio is loop time / bare forward time of the same repeat;
2. storage: bytes on disk, reading one example (every layer; median over random examples), one layer of
   every example, and one training epoch of reads (train split, shuffled, batches of 32, no probe);
   reads come from the page cache (the files were just written): this is decoding and parsing, not disk;
3. training: fitting the scoring probe (RMS norm, 1 epoch) with 1 and with 16 learning rates, through the
   same ``fit_shared`` on identical bf16 batches: probecache's loader (the 16 in one shared read pass, and
   as 16 separate runs) vs each baseline as a batch source of shuffled per-example reads (16 separate runs:
   one config per run, what a user's script does).

Layout: probecache's shards hold 64 examples here (``--shard-size``; the CLI's default is 512). Its loader decodes
the token range spanning a split's examples in each segment, so a shard that mixes splits is read whole for each;
a 500-example store with 512-example shards would be one shard holding all three splits. 64-example shards give
this sample the layout of the default 2,000-example store (splits share one or two shards at their boundaries).
The 16-variant section trains on the train examples of whole shards, for the same reason. Every read and fit
opens its files afresh, as a new process would. Loader vs raw decompression of the store is in bench/train.py.

    python bench/formats.py                 # rotten_tomatoes, 500 examples, 2 repeats (~5-8 min on 2 cores)
    python bench/formats.py --quick         # 120 examples, 1 repeat (~1 min)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does; must precede torch's OpenMP start-up

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from baseline_formats import (  # noqa: E402  (bench/ is on sys.path)
    FORMATS,
    ReaderBatches,
    Shape,
    StoreReader,
    forward_and_write,
    make_writer,
    open_reader,
)
from common import bare_forward_seconds, prepare  # noqa: E402
from probecache.extract.run import extract  # noqa: E402
from probecache.store.reader import open_store  # noqa: E402
from probecache.train.data import Splits, SplitSpec, TokenBatches, resolve_splits, split_examples  # noqa: E402
from probecache.train.probes import ProbeConfig  # noqa: E402
from probecache.train.trainer import TrainConfig, Variant, fit_shared  # noqa: E402

PC = "probecache"
LRS_16 = [float(x) for x in np.geomspace(1e-5, 3e-2, 16)]


def log(message: str) -> None:
    print(f"[formats {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotated(names: list[str], r: int) -> list[str]:
    """Repeat r's order: reversed on odd repeats, rotated by one every two (each item runs early and late)."""
    k = (r // 2) % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if r % 2 else order


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


# ---- 1. extraction ---------------------------------------------------------------------------------------------


def run_extraction(model, batches, pad_id, config, shape, formats, repeats, scratch: Path) -> dict:
    """Loop seconds per writer and per repeat; the bare forward runs first and last in each repeat."""
    seconds: dict[str, list[float]] = {n: [] for n in ("bare", PC, *formats)}
    ratios: dict[str, list[float]] = {n: [] for n in (PC, *formats)}
    store_path = None
    for r in range(repeats):
        bare = [bare_forward_seconds(model, batches, pad_id)]
        this: dict[str, float] = {}
        for name in rotated([PC, *formats], r):
            if name == PC:
                shutil.rmtree(scratch / "stores", ignore_errors=True)
                result = extract(replace(config, root=str(scratch / "stores")))
                this[name], store_path = result.loop_seconds, result.store_path
            else:
                shutil.rmtree(scratch / name, ignore_errors=True)
                this[name] = forward_and_write(model, batches, pad_id, make_writer(name, scratch / name, shape))
            log(f"extraction repeat {r + 1}: {name} {this[name]:.1f} s")
        bare.append(bare_forward_seconds(model, batches, pad_id))
        seconds["bare"].append(statistics.mean(bare))  # the mean of both ends: drift within the repeat cancels
        log(f"extraction repeat {r + 1}: bare {bare[0]:.1f} s, {bare[1]:.1f} s")
        for name, s in this.items():
            seconds[name].append(s)
            ratios[name].append(s / seconds["bare"][-1])
    return {"seconds": seconds, "overhead_ratios": ratios, "store_path": str(store_path)}


# ---- 2. storage ------------------------------------------------------------------------------------------------


@dataclass
class Formats:
    """Where every format lives, and the split membership and labels (from the store's manifest)."""

    store_path: Path
    scratch: Path
    names: list[str]  # probecache first
    splits: Splits
    examples: dict  # SplitSpec -> (example ids, labels)
    dtype: torch.dtype  # what the store's loader yields: the baselines' batches are cast to it

    def reader(self, name: str):
        """A fresh reader, as a new process opens it (mmap and h5py state from an earlier read never carries)."""
        return StoreReader(open_store(self.store_path)) if name == PC else open_reader(name, self.scratch / name)

    def split(self, spec: SplitSpec) -> tuple[list[str], np.ndarray]:
        if spec not in self.examples:
            self.examples[spec] = split_examples(open_store(self.store_path), spec)
        return self.examples[spec]

    def sources(self, name: str, train: SplitSpec, validation: SplitSpec):
        """(train, validation) batch sources opened afresh: the store's own loader, or per-example reads."""
        if name == PC:
            store = open_store(self.store_path)
            return (TokenBatches(store, train, None, 32, True, seed=0),
                    TokenBatches(store, validation, None, 32, False))
        reader = self.reader(name)
        return (ReaderBatches(reader, *self.split(train), 32, True, seed=0, dtype=self.dtype),
                ReaderBatches(reader, *self.split(validation), 32, False, dtype=self.dtype))


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def drain(source, epoch: int) -> int:
    return sum(len(b) for b in source.epoch(epoch))


def run_reads(fmt: Formats, sample: list[str], layer: int, repeats: int) -> dict:
    """Per format and repeat: median one-example read, one-layer read, one epoch of training reads."""
    out = {what: {n: [] for n in fmt.names} for what in ("example_s", "layer_s", "epoch_s")}
    for r in range(repeats):
        for name in rotated(fmt.names, r):
            reader = fmt.reader(name)
            out["example_s"][name].append(median([timed(reader.read_example, reader.position[e]) for e in sample]))
            reader = fmt.reader(name)
            out["layer_s"][name].append(timed(reader.read_layer, layer))
            out["epoch_s"][name].append(timed(drain, fmt.sources(name, fmt.splits.train, fmt.splits.validation)[0], r))
            log(f"reads repeat {r + 1}: {name} example {out['example_s'][name][-1] * 1e3:.1f} ms, layer "
                f"{out['layer_s'][name][-1]:.2f} s, epoch {out['epoch_s'][name][-1]:.2f} s")
    return out


# ---- 3. training -----------------------------------------------------------------------------------------------


def scoring_variants(store, lrs: list[float]) -> list[Variant]:
    probe = ProbeConfig("scoring", store.n_layers, store.hidden_size, len(store.label_names), norm="rms")
    return [Variant(probe, TrainConfig(lr=lr, epochs=1, patience=1, seed=0)) for lr in lrs]


def fit_seconds(fmt: Formats, name: str, variants, train: SplitSpec, validation: SplitSpec, counts) -> float:
    """One run: open the data (as a fresh process would), fit every variant on one shared read per epoch."""
    started = time.perf_counter()
    fit_shared(variants, *fmt.sources(name, train, validation), "accuracy", counts, progress=False)
    return time.perf_counter() - started


def whole_segments(store, spec: SplitSpec, n: int) -> SplitSpec:
    """About ``n`` examples of ``spec``: whole segments holding nothing else, in storage order. A random subset
    would be unfair to probecache: its loader decodes the token range spanning a split's examples in each
    segment, so a sparse subset of every segment costs nearly a full read."""
    table = store.manifest(columns=["example_id", "split", "segment"])
    wanted = set(split_examples(store, spec)[0])
    members: dict[str, list[str]] = {}
    for eid, segment in zip(table["example_id"].to_pylist(), table["segment"].to_pylist(), strict=True):
        members.setdefault(segment, []).append(eid)
    chosen: list[str] = []
    for ids in members.values():
        if len(chosen) < n and all(e in wanted for e in ids):
            chosen += ids
    return SplitSpec(spec.split, frozenset(chosen)) if 0 < len(chosen) < len(wanted) else spec


def run_training(fmt: Formats, store, counts, repeats, sixteen_train: SplitSpec, separate_pc: bool) -> dict:
    """1 variant on the train split; 16 variants on ``sixteen_train``; both validated on the validation split."""
    train, validation = fmt.splits.train, fmt.splits.validation
    one = {n: [] for n in fmt.names}
    for r in range(repeats):
        for name in rotated(fmt.names, r):
            one[name].append(fit_seconds(fmt, name, scoring_variants(store, LRS_16[4:5]), train, validation, counts))
            log(f"training repeat {r + 1}: {name} 1 variant {one[name][-1]:.1f} s")
    variants = scoring_variants(store, LRS_16)
    shared = fit_seconds(fmt, PC, variants, sixteen_train, validation, counts)
    log(f"training: {PC} 16 variants in one shared pass {shared:.1f} s")
    # 16 separate runs per format (a user's script: one config per run), interleaved run by run against drift
    separate = {n: 0.0 for n in fmt.names if n != PC or separate_pc}
    for i, variant in enumerate(variants):
        for name in rotated(list(separate), i):
            separate[name] += fit_seconds(fmt, name, [variant], sixteen_train, validation, counts)
    log("training: 16 separate runs " + ", ".join(f"{n} {s:.1f} s" for n, s in separate.items()))
    return {"one_variant_s": one, "sixteen_shared_s": {PC: shared}, "sixteen_separate_s": separate,
            "sixteen_train_examples": len(fmt.split(sixteen_train)[0]),
            "sixteen_validation_examples": len(fmt.split(validation)[0]),
            "sixteen_subset": sixteen_train.ids is not None}


# ---- report ----------------------------------------------------------------------------------------------------


def ratio_text(value: float, reference: float) -> str:
    if not reference or not math.isfinite(value):
        return "-"
    ratio = value / reference
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3f}x"


def tables(res: dict) -> str:
    names = res["formats_measured"]
    ext, st, tr = res["extraction"], res["storage"], res["training"]
    lines = [f"{res['examples']:,} examples / {res['tokens']:,} tokens, L+1 = {res['n_layers']}, d = "
             f"{res['hidden_size']}, T_max = {res['t_max']}; {res['repeats']} interleaved repeat(s); "
             f"{res['model']} ({res['dtype']}), {res['torch_threads']} torch threads", ""]
    lines += ["### Extraction (loop time / bare forward of the same batches, same repeat)", "",
              "| writer | tok/s | overhead ratio (loop / bare) | repeats | loop time vs probecache |",
              "|---|---|---|---|---|",
              f"| bare forward | {res['tokens'] / median(ext['seconds']['bare']):,.0f} | 1.00 | | |"]
    for n in names:
        rs = ext["overhead_ratios"][n]
        vs = median([a / b for a, b in zip(ext["seconds"][n], ext["seconds"][PC], strict=True)])
        lines.append(f"| {n} | {res['tokens'] / median(ext['seconds'][n]):,.0f} | **{median(rs):.2f}** | "
                     f"{', '.join(f'{x:.2f}' for x in rs)} | {vs:.2f}x |")
    pc_bytes, pc_hidden = st["bytes"][PC], st["pc_hidden_bytes"]
    lines += ["", "### Storage (ratios to probecache; reads from the page cache)", "",
              "| format | bytes on disk | vs probecache (all arrays / hidden only) | allocated | write overhead "
              "(loop / bare) | one example, all layers (ms) | one layer, all examples (ms) | epoch of reads (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for n in names:
        ex, ly, ep = (median(st[k][n]) for k in ("example_s", "layer_s", "epoch_s"))
        ex0, ly0, ep0 = (median(st[k][PC]) for k in ("example_s", "layer_s", "epoch_s"))
        lines.append(f"| {n} | {st['bytes'][n] / 1e6:,.0f} MB | {ratio_text(st['bytes'][n], pc_bytes)} / "
                     f"{ratio_text(st['bytes'][n], pc_hidden)} | {st['allocated'][n] / 1e6:,.0f} MB | "
                     f"{median(ext['overhead_ratios'][n]):.2f} | {ex * 1e3:.2f} ({ratio_text(ex, ex0)}) | "
                     f"{ly * 1e3:,.{1 if ly < 0.1 else 0}f} ({ratio_text(ly, ly0)}) | "
                     f"{ep:.2f} ({ratio_text(ep, ep0)}) |")
    lines += [f"\nprobecache's hidden arrays alone: {pc_hidden / 1e6:,.0f} MB (the store also holds fp32 pooled "
              "means, last-token states and manifests).", ""]
    sub = (f"{tr['sixteen_train_examples']:,} train / {tr['sixteen_validation_examples']:,} validation examples"
           + (" (the train examples of whole shards, to fit the time budget)" if tr["sixteen_subset"] else ""))
    lines += ["### Training (scoring probe, RMS norm, 1 epoch, batches of 32; ratios to probecache)", "",
              f"1 variant: the full train split. 16 variants (learning rates): {sub}.", "",
              "| format | 1 variant (s) | 16 variants, 16 separate runs (s) | 16 variants, one shared pass (s) |",
              "|---|---|---|---|"]
    one0 = median(tr["one_variant_s"][PC])
    shared = tr["sixteen_shared_s"][PC]
    for n in names:
        one = median(tr["one_variant_s"][n])
        sep = tr["sixteen_separate_s"].get(n)
        sep_text = "-" if sep is None else f"{sep:.1f} ({ratio_text(sep, shared)} of probecache's shared pass)"
        shared_text = f"**{shared:.1f}**" if n == PC else "-"
        lines.append(f"| {n} | {one:.1f} ({ratio_text(one, one0)}) | {sep_text} | {shared_text} |")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="120 examples, 1 repeat")
    parser.add_argument("--limit", type=int, default=None, help="examples (default 500; quick 120)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 2; quick 1)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--dataset", default="rotten_tomatoes")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="baselines to run")
    parser.add_argument("--scratch", default=None, help="where the formats are written (default: a temp dir); "
                                                        "everything written is deleted at the end")
    parser.add_argument("--example-reads", type=int, default=50, help="random examples timed per format")
    parser.add_argument("--sixteen-train", type=int, default=None,
                        help="train examples of the 16-variant section, in whole shards (default 128; quick 32)")
    parser.add_argument("--shard-size", type=int, default=64,
                        help="probecache examples per shard (default 64: see the module docstring)")
    parser.add_argument("--no-separate-probecache", action="store_true",
                        help="skip probecache's own 16 separate runs")
    args = parser.parse_args()
    limit = args.limit or (120 if args.quick else 500)
    repeats = args.repeats or (1 if args.quick else 2)
    formats = list(dict.fromkeys(args.formats))
    started = time.perf_counter()
    base = Path(args.scratch) if args.scratch else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="probecache-formats-", dir=base))
    try:
        result = run(args, limit, repeats, formats, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "formats.json").write_text(json.dumps(result, indent=1))
    print(tables(result))
    print(f"\n(wall time {result['wall_s']:.0f} s; {out / 'formats.json'})")


def run(args, limit: int, repeats: int, formats: list[str], scratch: Path) -> dict:
    log(f"{args.dataset}: {limit} examples, {repeats} repeat(s), formats {', '.join(formats)}; scratch {scratch}")
    config, model, batches, pad_id, device = prepare(args.dataset, None, limit, args.model, args.dtype,
                                                     scratch / "stores", shard_size=args.shard_size)
    planned = [p for b in batches for p in b]
    dtype = next(model.parameters()).dtype
    shape = Shape(model.config.num_hidden_layers + 1, model.config.hidden_size, len(planned),
                  max(p.n_tokens for p in planned), dtype)
    extraction = run_extraction(model, batches, pad_id, config, shape, formats, repeats, scratch)
    del model  # the reads and fits below do not need it

    store = open_store(extraction["store_path"])
    splits = resolve_splits(store)
    loader_dtype = TokenBatches(store, splits.validation, None, 32, False).stream.dtype
    fmt = Formats(Path(extraction["store_path"]), scratch, [PC, *formats], splits, {}, loader_dtype)
    train_ids, train_y = fmt.split(splits.train)
    counts = np.bincount(train_y, minlength=len(store.label_names))
    rng = np.random.default_rng(0)
    sample = [train_ids[i] for i in rng.choice(len(train_ids), min(args.example_reads, len(train_ids)), False)]
    storage = run_reads(fmt, sample, shape.n_layers // 2, repeats)
    readers = {n: fmt.reader(n) for n in fmt.names}
    storage["bytes"] = {n: r.bytes_on_disk() for n, r in readers.items()}
    storage["allocated"] = {n: r.bytes_allocated() for n, r in readers.items()}
    storage["pc_hidden_bytes"] = readers[PC].hidden_bytes()
    del readers

    sixteen = whole_segments(store, splits.train, args.sixteen_train or (32 if args.quick else 128))
    training = run_training(fmt, store, counts, repeats, sixteen, not args.no_separate_probecache)
    tokens = sum(p.n_tokens for p in planned)
    return {"dataset": args.dataset, "model": args.model, "dtype": str(dtype).removeprefix("torch."),
            "device": device, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "examples": len(planned), "tokens": tokens,
            "batches": len(batches), "n_layers": shape.n_layers, "hidden_size": shape.hidden_size,
            "t_max": shape.t_max, "repeats": repeats, "formats_measured": [PC, *formats],
            "example_reads": len(sample), "layer_read": shape.n_layers // 2,
            "extraction": {k: v for k, v in extraction.items() if k != "store_path"},
            "storage": storage, "training": training}


if __name__ == "__main__":
    main()
