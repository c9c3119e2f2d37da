"""Scaling benchmark: how extraction time, training time and disk grow with examples and with sequence length.

Two sweeps, each point a fresh store written by probecache's own extractor and deleted once measured:

  1. examples x1, x4, x16 of the embedded rotten_tomatoes reviews (~25 tokens each): extraction loop time,
     tokens/s, bytes on disk, one-example reads, and one epoch of the scoring probe and one of MHA
     (downcast 32, RMS-normalised tokens) per size.
  2. sequence length T at a fixed token budget: documents of exactly T tokens, made by concatenating the
     same Rotten Tomatoes reviews in file order (every T sees the same text, cut differently) into a CSV
     extracted with ``max_tokens=T``. Per T also: the bare forward of the extractor's own batches (a quarter
     of them, right before the extraction: the overhead ratio), peak RSS of each phase, and, in full mode,
     one batch per T timed again side by side in the order A B C C B A (the forward's T-scaling, free of
     the drift between points minutes apart).

Every cost is also given per token, normalised to the first point (1.00 = linear in tokens). Absolute
seconds on shared 2-core machines drift; ratios of points measured in one process drift less, and the
interleaved forward not at all to first order. Fixed costs are measured, not assumed: extraction wall time
minus loop time (model load, tokenisation, plan, store header), and the intercepts of straight-line fits of
loop and epoch seconds against tokens. Memory is the kernel's high-water mark, reset per phase.

    python bench/scaling.py                # x1 = 100 examples; T = 64, 256, 1024 at 16,384 tokens each
    python bench/scaling.py --quick        # x1 = 25; T = 64, 256, 1024 at 2,048 tokens (>= 3 examples)
    python bench/scaling.py --lengths 64,256,1024,2048      # adds T = 2048 (~1.5 min more)

  3. ``--rss`` (bench/scaling_rss.py, instead of 1 and 2): training memory at x1 / x4 / x16 store sizes, each
     epoch in its own child process (peak RSS = its VmHWM), with a shuffle buffer smaller than the smallest
     store: peak RSS and tokens/s of a scoring and an MHA/8 epoch, loader / raw decompression, and a scoring
     epoch from torch.save files. Stores go under ``--stores``, are reused when present and deleted unless
     ``--keep`` (``make bench-scale``; docs/BENCHMARKS.md, "Scale").

    python bench/scaling.py --rss                           # rotten_tomatoes, --limit 100,400,1600 (~25 min)
    python bench/scaling.py --rss --limits 50,200,800 --keep    # smoke size, stores kept for a rerun
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (see bench/extract.py)

import argparse  # noqa: E402
import csv  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import bare_forward_seconds, disk_bytes  # noqa: E402  (bench/common.py; bench/ is on sys.path)
from probecache.extract.config import ExtractConfig  # noqa: E402
from probecache.extract.datasets import load_dataset  # noqa: E402
from probecache.extract.plan import batches  # noqa: E402
from probecache.extract.prepare import freeze_plan, prepare  # noqa: E402
from probecache.extract.run import extract  # noqa: E402
from probecache.lm.models import load_model, resolve_device, resolve_dtype, resolve_model  # noqa: E402
from probecache.lm.tokens import pad_token_id  # noqa: E402
from probecache.store.reader import open_store  # noqa: E402
from probecache.train.data import batch_source, labels_of, resolve_splits  # noqa: E402
from probecache.train.probes import ProbeConfig  # noqa: E402
from probecache.train.sweep import auto_heads  # noqa: E402
from probecache.train.trainer import TrainConfig, Variant, fit_shared  # noqa: E402

PROBES = ("scoring", "mha")
DOWNCAST = 32


# ---- memory: peak RSS of one phase, in this process ---------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRss:
    """Peak resident memory of a ``with`` block: freed memory is handed back first (gc + malloc_trim) and the
    kernel's high-water mark reset (writing 5 to /proc/self/clear_refs), so each phase gets its own peak
    without a child process per point. ``peak_mb`` / ``base_mb`` stay None where Linux's /proc is missing."""

    def __enter__(self) -> PeakRss:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base_mb = self.peak_mb = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status_kib("VmRSS")
            self.base_mb = base / 1024 if base is not None else None
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM") if self.base_mb is not None else None
        self.peak_mb = peak / 1024 if peak is not None else None

    @property
    def growth_mb(self) -> float | None:
        return None if self.peak_mb is None else self.peak_mb - self.base_mb


# ---- measurements of one store ---------------------------------------------------------------------------


def one_example_reads(store, max_examples: int = 32, max_tokens: int = 4096) -> dict:
    """Read examples one at a time (``store.hidden``, all layers; the first ones in manifest order, up to
    ``max_examples`` or ``max_tokens``), best of two passes, and count the inner chunks they touch: a read
    decodes whole (1, chunk, d) chunks, so examples shorter than a chunk decode more tokens than they hold."""
    table = store.manifest(columns=["example_id", "segment", "token_offset", "n_tokens"])
    rows, tokens = [], 0
    for row in zip(*(table[c].to_pylist() for c in ("example_id", "segment", "token_offset", "n_tokens")),
                   strict=True):
        if len(rows) == max_examples or (rows and tokens + row[3] > max_tokens):
            break
        rows.append(row)
        tokens += row[3]
    chunk = store.segment_array(rows[0][1], "hidden").chunks[1]
    store.hidden(rows[0][0])  # the manifest index and the first segment's metadata, once
    passes = []
    for _ in range(2):  # the files were just written: both passes read from the page cache
        started = time.perf_counter()
        for eid, *_ in rows:
            store.hidden(eid)
        passes.append(time.perf_counter() - started)
    decoded = sum(((off + n - 1) // chunk - off // chunk + 1) * chunk for _, _, off, n in rows)
    return {"examples": len(rows), "tokens": tokens, "seconds": min(passes), "tokens_per_s": tokens / min(passes),
            "inner_chunk_tokens": chunk, "decoded_tokens": decoded, "decode_amplification": decoded / tokens}


def split_tokens(store, split: str) -> int:
    return int(sum(store.manifest(split=split, columns=["n_tokens"])["n_tokens"].to_pylist()))


class CountingSource:
    """A batch source that counts real and padded token slots of the batches it yields (each batch is padded
    to its own longest example, so probe compute follows the padded count)."""

    def __init__(self, source):
        self.source, self.n_batches = source, source.n_batches
        self.real = self.padded = self.largest = 0

    def epoch(self, epoch: int):
        for batch in self.source.epoch(epoch):
            self.real += int(batch.mask.sum())
            self.padded += batch.mask.numel()
            self.largest = max(self.largest, batch.mask.numel())
            yield batch


def train_epochs(store) -> dict:
    """One epoch of each probe (fit_shared: the train read and steps, then the validation pass), timed alone."""
    started = time.perf_counter()
    splits = resolve_splits(store)
    counts = np.bincount(labels_of(store, splits.train), minlength=len(store.label_names))
    tokens = split_tokens(store, splits.train.split) + split_tokens(store, splits.validation.split)
    out: dict = {"tokens_per_epoch": tokens, "setup_s": time.perf_counter() - started}
    d = store.hidden_size
    for name in PROBES:
        variant = Variant(ProbeConfig(name, store.n_layers, d, len(store.label_names), downcast=DOWNCAST,
                                      heads=auto_heads(d // DOWNCAST), norm="rms"),
                          TrainConfig(lr=1e-3, epochs=1, patience=1, seed=0))
        with PeakRss() as mem:
            started = time.perf_counter()
            train = CountingSource(batch_source(store, splits.train, variant.probe, None, 32, True, seed=0))
            val = CountingSource(batch_source(store, splits.validation, variant.probe, None, 32, False, seed=0))
            fit_shared([variant], train, val, "accuracy", counts, progress=False)
            seconds = time.perf_counter() - started
        out[name] = {"epoch_s": seconds, "us_per_token": seconds / tokens * 1e6, "peak_rss_mb": mem.peak_mb,
                     "rss_growth_mb": mem.growth_mb}
        out["batch_padding_fraction"] = 1 - (train.real + val.real) / (train.padded + val.padded)
        out["largest_batch_token_slots"] = max(train.largest, val.largest)  # B x T_max
    return out


def extract_point(config: ExtractConfig) -> dict:
    """Extract one store, measure it (disk, reads, training), delete it."""
    with PeakRss() as mem:
        result = extract(config)
    t = result.totals
    store = open_store(result.store_path)
    lengths = store.manifest(columns=["n_tokens"])["n_tokens"].to_pylist()
    point = {
        "examples": t.examples, "tokens": t.tokens, "padded_tokens": t.padded_tokens, "shards": t.shards,
        "n_tokens_min": min(lengths), "n_tokens_max": max(lengths),
        "extract_loop_s": result.loop_seconds, "extract_wall_s": result.wall_seconds,
        "fixed_s": result.wall_seconds - result.loop_seconds, "forward_s_in_loop": result.forward_seconds,
        "tokens_per_s": t.tokens / result.loop_seconds, "padding_fraction": 1 - t.tokens / t.padded_tokens,
        "compression_ratio": t.hidden_bytes_raw / t.hidden_bytes_stored,
        "bytes_stored_arrays": t.bytes_stored,
        # hidden states per token; the per-example arrays (fp32 means, last-token states) per example; the rest
        # of the disk (manifests, plan, store.json, zarr metadata) per store
        "hidden_kib_per_token": t.hidden_bytes_stored / t.tokens / 1024,
        "per_example_arrays_kib": (t.bytes_stored - t.hidden_bytes_stored) / t.examples / 1024,
        "extract_peak_rss_mb": mem.peak_mb, "extract_rss_growth_mb": mem.growth_mb,
    }
    point["disk_bytes"], point["disk_allocated_bytes"] = disk_bytes(result.store_path)
    point["kib_per_token"] = point["disk_bytes"] / t.tokens / 1024
    point["metadata_bytes"] = point["disk_bytes"] - t.bytes_stored
    point["read"] = one_example_reads(store)
    point["train"] = train_epochs(store)
    del store
    shutil.rmtree(result.store_path)
    return point


def normalise(points: list[dict]) -> None:
    """Per-token costs over the first point's: 1.00 = linear in tokens, > 1 = costlier per token."""
    def costs(p: dict) -> dict:
        c = {"extract": p["extract_loop_s"] / p["tokens"], "extract_wall": p["extract_wall_s"] / p["tokens"],
             "disk": p["disk_bytes"] / p["tokens"], "one_example_read": 1 / p["read"]["tokens_per_s"]}
        if "bare_forward_tokens_per_s" in p:
            c["bare_forward"] = 1 / p["bare_forward_tokens_per_s"]
        if "bare_interleaved_tokens_per_s" in p:
            c["bare_forward_interleaved"] = 1 / p["bare_interleaved_tokens_per_s"]
        c |= {name: p["train"][name]["us_per_token"] for name in PROBES}
        return c
    first = costs(points[0])
    for p in points:
        p["per_token_vs_first"] = {k: v / first[k] for k, v in costs(p).items()}


def line_fit(x: list[float], y: list[float]) -> dict | None:
    """Least-squares y = intercept + slope * x (None with fewer than two distinct x)."""
    if len(set(x)) < 2:
        return None
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return {"intercept": float(intercept), "slope": float(slope)}


# ---- sweep 1: examples -----------------------------------------------------------------------------------


def size_sweep(args, sizes: list[int], scratch: Path) -> tuple[list[dict], dict]:
    points = []
    for n in sizes:
        started = time.perf_counter()
        config = ExtractConfig(dataset="rotten_tomatoes", limit=n, model=args.model, dtype=args.dtype,
                               device=args.device, root=str(scratch / f"size-{n}"), progress=False)
        points.append({"factor": n / sizes[0], **extract_point(config), "point_wall_s": time.perf_counter() - started})
        print(f"[scaling] {n} examples: {points[-1]['point_wall_s']:.1f} s", file=sys.stderr)
    normalise(points)
    fits = {"extract_loop_s_vs_tokens": line_fit([p["tokens"] for p in points],
                                                 [p["extract_loop_s"] for p in points])}
    for name in PROBES:
        fits[f"{name}_epoch_s_vs_tokens"] = line_fit([p["train"]["tokens_per_epoch"] for p in points],
                                                     [p["train"][name]["epoch_s"] for p in points])
    fits["disk_bytes_vs_tokens"] = line_fit([p["tokens"] for p in points], [p["disk_bytes"] for p in points])
    return points, fits


# ---- sweep 2: sequence length ----------------------------------------------------------------------------


def long_documents(reviews: list, tokenizer, length: int, n: int) -> list[tuple[str, str]]:
    """n documents of at least ``length`` tokens: consecutive reviews (file order, from the first, wrapping)
    joined by spaces. Labels alternate (positive, negative, ...) so every split of a few documents has both
    classes: the probes here are timed, not evaluated."""
    docs, i = [], 0
    for k in range(n):
        parts, estimate = [], 0
        while True:
            parts.append(reviews[i % len(reviews)].text)
            i += 1
            estimate += len(tokenizer(parts[-1], add_special_tokens=False)["input_ids"])
            # joining can merge tokens at the seams: check the document itself once the estimate is there
            if estimate >= length and len(tokenizer(" ".join(parts))["input_ids"]) >= length:
                break
        docs.append((" ".join(parts), ("positive", "negative")[k % 2]))
    return docs


def write_length_csv(path: Path, docs: list[tuple[str, str]]) -> None:
    """An explicit split column (every 8th document validation, the rest train, no test) so nothing is
    carved and no document is extracted only to go unused."""
    n = len(docs)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "split"])
        for i, (text, label) in enumerate(docs):
            split = "validation" if i % 8 == 7 or (n < 8 and i == n - 1) else "train"
            w.writerow([f"doc-{i:05d}", text, label, split])


def attention_share(model, length: int) -> float:
    """Model, not measurement: causal attention MACs per token (q.k and a.v over (T + 1) / 2 positions on
    average, every layer) over the MACs of the linear layers per token (their weights' sizes)."""
    linear = sum(p.numel() for n, p in model.base_model.layers.named_parameters() if p.dim() == 2)
    c = model.config
    width = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return c.num_hidden_layers * 2 * width * (length + 1) / 2 / linear


def bare_run(model, timed: list, pad_id: int, runs: list) -> None:
    with PeakRss() as mem:
        seconds = bare_forward_seconds(model, timed, pad_id)
    runs.append((seconds, mem))


def interleaved_forward(model, first_batches: dict[int, list], pad_id: int, points: list[dict]) -> None:
    """The forward-pass cost of each T measured side by side: one full batch per T in the order
    A B C C B A, so a machine that speeds up or slows down meanwhile moves every T alike (the per-point
    bare forwards are minutes apart, too far for comparing T with T on a shared machine)."""
    order = list(first_batches) + list(reversed(first_batches))
    seconds = dict.fromkeys(first_batches, 0.0)
    for length in order:
        seconds[length] += bare_forward_seconds(model, [first_batches[length]], pad_id)
    for p in points:
        tokens = 2 * sum(e.n_tokens for e in first_batches[p["T"]])
        p["bare_interleaved_tokens_per_s"] = tokens / seconds[p["T"]]


def mha_attention_share(d: int, length: int) -> float:
    """Model, not measurement: the MHA probe's q.k and a.v MACs per token (2 x T x d_inner, every key of a
    padded row) over its four projections' (4 x d x d_inner), per layer: T / (2 d)."""
    d_inner = d // DOWNCAST
    return 2 * length * d_inner / (4 * d * d_inner)


def length_sweep(args, lengths: list[int], budget: int, scratch: Path) -> tuple[list[dict], dict]:
    device = resolve_device(args.device)
    # One bare-forward model for every T: a constant in each phase's RSS baseline, not part of its growth.
    model, tokenizer = load_model(resolve_model(args.model), resolve_dtype(args.dtype, device), device)
    pad_id = pad_token_id(tokenizer)
    reviews = load_dataset("rotten_tomatoes").splits["train"]
    points, first_batches = [], {}
    for length in lengths:
        started = time.perf_counter()
        n = max(3, budget // length)  # two train documents (both classes) and one validation
        data = scratch / f"docs-{length}.csv"
        write_length_csv(data, long_documents(reviews, tokenizer, length, n))
        config = ExtractConfig(dataset=f"csv:{data}", max_tokens=length, model=args.model, dtype=args.dtype,
                               device=args.device, root=str(scratch / f"len-{length}"), progress=False)
        # The exact batches the extractor will run, of which whole batches holding >= a quarter of the
        # tokens are timed bare (a rate; each batch holds ~batch_tokens, so the share is even).
        prep = prepare(config)
        freeze_plan(prep, write=False)
        planned = [b for s, shard in sorted(prep.by_shard().items())
                   for b in batches(shard, config.batch_tokens, config.max_batch_size)]
        timed, tokens = [], 0
        for b in planned:
            if tokens >= budget // 4:
                break
            timed.append(b)
            tokens += sum(p.n_tokens for p in b)
        if not points:  # the bare model's first call sets up threads and kernels: not part of any rate
            bare_forward_seconds(model, [planned[0][:1]], pad_id)
        # The bare forward right before the extraction: the overhead ratio compares the two a minute apart.
        runs: list[tuple[float, PeakRss]] = []
        bare_run(model, timed, pad_id, runs)
        first_batches[length] = planned[0]
        (seconds, mem), = runs
        point = {"T": length, **extract_point(config), "bare_forward_tokens": tokens, "bare_forward_s": seconds,
                 "bare_forward_tokens_per_s": tokens / seconds, "bare_peak_rss_mb": mem.peak_mb,
                 "bare_rss_growth_mb": mem.growth_mb, "batches": len(planned),
                 "batch_size": max(len(b) for b in planned),
                 "attention_macs_share_model": attention_share(model, length),
                 "mha_probe_attention_share_model": mha_attention_share(model.config.hidden_size, length)}
        point["overhead_ratio"] = point["bare_forward_tokens_per_s"] / point["tokens_per_s"]
        point["point_wall_s"] = time.perf_counter() - started
        points.append(point)
        print(f"[scaling] T = {length}: {n} examples, {point['point_wall_s']:.1f} s", file=sys.stderr)
        data.unlink()
    if not args.quick:
        interleaved_forward(model, first_batches, pad_id, points)
    normalise(points)
    bare_key = "bare_interleaved_tokens_per_s" if "bare_interleaved_tokens_per_s" in points[0] else \
        "bare_forward_tokens_per_s"
    fits = {"bare_s_per_token_vs_T": line_fit(lengths, [1 / p[bare_key] for p in points]),
            "extract_s_per_token_vs_T": line_fit(lengths, [1 / p["tokens_per_s"] for p in points])}
    for name in PROBES:
        fits[f"{name}_s_per_token_vs_T"] = line_fit(lengths, [p["train"][name]["us_per_token"] / 1e6
                                                              for p in points])
    return points, fits


# ---- report ------------------------------------------------------------------------------------------------


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def markdown(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows])


def ratio_rows(points: list[dict], keys: list[tuple[str, str]], unit: str) -> list[tuple[str, list[str]]]:
    return [(f"{label} per token vs {unit}", [f"{p['per_token_vs_first'][k]:.2f}" for p in points])
            for k, label in keys if k in points[0]["per_token_vs_first"]]


def size_table(points: list[dict]) -> str:
    rows = [
        ("examples / tokens", [f"{p['examples']:,} / {p['tokens']:,}" for p in points]),
        ("shards", [str(p["shards"]) for p in points]),
        ("extraction loop s (+ fixed s: load, plan)", [f"{p['extract_loop_s']:.1f} (+{p['fixed_s']:.1f})"
                                                       for p in points]),
        ("extraction tok/s (loop)", [f"{p['tokens_per_s']:,.0f}" for p in points]),
        ("disk MB (allocated MB)", [f"{p['disk_bytes'] / 1e6:,.1f} ({p['disk_allocated_bytes'] / 1e6:,.1f})"
                                    for p in points]),
        ("KiB on disk per token (hidden states alone)",
         [f"{p['kib_per_token']:.1f} ({p['hidden_kib_per_token']:.1f})" for p in points]),
        ("store metadata KB (manifests, plan, zarr.json)", [f"{p['metadata_bytes'] / 1e3:,.0f}" for p in points]),
        ("extraction peak RSS MB (growth)", [f"{_mb(p['extract_peak_rss_mb'])} (+{_mb(p['extract_rss_growth_mb'])})"
                                             for p in points]),
        ("train + validation tokens per epoch", [f"{p['train']['tokens_per_epoch']:,}" for p in points]),
        ("scoring: s per epoch", [f"{p['train']['scoring']['epoch_s']:.2f}" for p in points]),
        ("MHA /32: s per epoch", [f"{p['train']['mha']['epoch_s']:.2f}" for p in points]),
        ("padding of training batches", [f"{p['train']['batch_padding_fraction']:.1%}" for p in points]),
        ("one-example reads tok/s (chunk decode amplification)",
         [f"{p['read']['tokens_per_s']:,.0f} ({p['read']['decode_amplification']:.1f}x)" for p in points]),
    ]
    rows += ratio_rows(points, [("extract", "extraction loop"), ("extract_wall", "extraction incl. fixed"),
                                ("disk", "disk"), ("scoring", "scoring epoch"), ("mha", "MHA epoch")], "x1")
    return markdown(["metric"] + [f"x{p['factor']:g}" for p in points], rows)


def length_table(points: list[dict]) -> str:
    rows = [
        ("examples x T = tokens (min..max per example)",
         [f"{p['examples']} x {p['T']} = {p['tokens']:,} ({p['n_tokens_min']}..{p['n_tokens_max']})" for p in points]),
        ("batches x examples per batch", [f"{p['batches']} x {p['batch_size']}" for p in points]),
        ("bare forward tok/s (right before the extraction)",
         [f"{p['bare_forward_tokens_per_s']:,.0f}" for p in points]),
        ("extraction tok/s (loop)", [f"{p['tokens_per_s']:,.0f}" for p in points]),
        ("overhead ratio (extraction / bare forward)", [f"{p['overhead_ratio']:.3f}" for p in points]),
        ("padding of processed tokens", [f"{p['padding_fraction']:.1%}" for p in points]),
        ("attention / linear MACs per token (model)", [f"{p['attention_macs_share_model']:.2f}" for p in points]),
        ("KiB on disk per token (hidden states alone)",
         [f"{p['kib_per_token']:.1f} ({p['hidden_kib_per_token']:.1f})" for p in points]),
        ("peak RSS growth MB: bare forward / extraction",
         [f"+{_mb(p['bare_rss_growth_mb'])} / +{_mb(p['extract_rss_growth_mb'])}" for p in points]),
        ("peak RSS growth MB: scoring / MHA epoch",
         [f"+{_mb(p['train']['scoring']['rss_growth_mb'])} / +{_mb(p['train']['mha']['rss_growth_mb'])}"
          for p in points]),
        ("largest training batch, token slots (B x T)",
         [f"{p['train']['largest_batch_token_slots']:,}" for p in points]),
        ("MHA probe attention / projection MACs (model)",
         [f"{p['mha_probe_attention_share_model']:.2f}" for p in points]),
        ("scoring: us per token", [f"{p['train']['scoring']['us_per_token']:.0f}" for p in points]),
        ("MHA /32: us per token", [f"{p['train']['mha']['us_per_token']:.0f}" for p in points]),
        ("one-example reads tok/s (chunk decode amplification)",
         [f"{p['read']['tokens_per_s']:,.0f} ({p['read']['decode_amplification']:.2f}x)" for p in points]),
    ]
    if "bare_interleaved_tokens_per_s" in points[0]:
        rows.insert(3, ("bare forward tok/s (all T interleaved, ABCCBA)",
                        [f"{p['bare_interleaved_tokens_per_s']:,.0f}" for p in points]))
    rows += ratio_rows(points, [("bare_forward_interleaved", "bare forward (interleaved)"),
                                ("bare_forward", "bare forward"), ("extract", "extraction loop"), ("disk", "disk"),
                                ("scoring", "scoring epoch"), ("mha", "MHA epoch"),
                                ("one_example_read", "one-example read")], f"T={points[0]['T']}")
    return markdown(["metric"] + [f"T = {p['T']}" for p in points], rows)


def fit_lines(size_fits: dict, length_fits: dict, lengths: list[int]) -> list[str]:
    out = []
    f = size_fits.get("extract_loop_s_vs_tokens")
    if f:
        out.append(f"- sizes: extraction loop s = {f['intercept']:.2f} + {f['slope'] * 1e3:.3f} ms x tokens "
                   "(least squares over the sizes; the intercept is the per-run fixed cost inside the loop)")
    for name in PROBES:
        f = size_fits.get(f"{name}_epoch_s_vs_tokens")
        if f:
            out.append(f"- sizes: {name} epoch s = {f['intercept']:.2f} + {f['slope'] * 1e6:.1f} us x tokens")
    names = {"bare_s_per_token_vs_T": "bare forward", "extract_s_per_token_vs_T": "extraction loop",
             "scoring_s_per_token_vs_T": "scoring epoch", "mha_s_per_token_vs_T": "MHA epoch"}
    for key, label in names.items():
        f = length_fits.get(key)
        if not f:
            continue
        line = f"- lengths: {label} s/token = {f['intercept'] * 1e6:,.1f} us + {f['slope'] * 1e9:,.1f} ns x T"
        if f["slope"] > 0 and f["intercept"] > 0:
            shares = ", ".join(f"{f['slope'] * t / (f['intercept'] + f['slope'] * t):.0%}" for t in lengths)
            line += (f"; the T-proportional part is {shares} of the per-token cost at T = "
                     f"{', '.join(map(str, lengths))}, and equals the constant part at T = "
                     f"{f['intercept'] / f['slope']:,.0f}")
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="x1 = 25 examples, 2,048 tokens per length, no interleaved forward")
    parser.add_argument("--sizes", help="example counts, first = x1 [100,400,1600; quick 25,100,400]")
    parser.add_argument("--lengths", help="tokens per example [64,256,1024]")
    parser.add_argument("--budget", type=int, help="tokens per length point [16384; quick 2048]")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--scratch", help="folder for the temporary stores [a temp dir]; emptied at the end")
    rss = parser.add_argument_group("--rss: training memory at three store sizes (bench/scaling_rss.py)")
    rss.add_argument("--rss", action="store_true", help="run the memory benchmark instead of the sweeps")
    rss.add_argument("--limits", default="100,400,1600", help="--limit per size, first = x1 [100,400,1600]")
    rss.add_argument("--dataset", default="rotten_tomatoes")
    rss.add_argument("--data-dir", default=None)
    rss.add_argument("--shard-size", type=int, default=16, help="examples per segment [16]")
    rss.add_argument("--buffer-tokens", type=int, default=512, help="shuffle buffer of every epoch [512]")
    rss.add_argument("--max-tokens", type=int, default=512,
                     help="truncate examples at extraction (a low cap gives every size the same longest example, "
                          "so the same largest batch B x T_max: most of an epoch's RSS) [512, extract's default]")
    rss.add_argument("--layers", default="all", help="the probes' layers, e.g. 8,16,24 (also what the loader and "
                     "raw decompression read) [all]")
    rss.add_argument("--probes", default="scoring,mha", help="probes timed per size [scoring,mha (MHA/8)]")
    rss.add_argument("--repeats", type=int, default=2, help="loader / raw repeats (4 runs each) [2]")
    rss.add_argument("--no-torch-save", action="store_true", help="skip the parity comparison (store, decoded "
                     "cache, torch.save files)")
    rss.add_argument("--parity-repeats", type=int, default=2, help="interleaved repeats of the parity epochs [2]")
    rss.add_argument("--cold", action="store_true", help="drop each source's files from the page cache before "
                     "its parity epoch (posix_fadvise)")
    rss.add_argument("--stores", default="bench/out/scale-stores", help="where the stores live [%(default)s]")
    rss.add_argument("--keep", action="store_true", help="keep the stores (a rerun reuses them)")
    args = parser.parse_args()
    if args.rss:
        import scaling_rss  # bench/scaling_rss.py

        args.limits = [int(x) for x in args.limits.split(",")]
        args.probes = [x for x in args.probes.split(",") if x]
        if any(x not in scaling_rss.PROBES for x in args.probes) or len(args.limits) < 2:
            parser.error(f"--probes takes {', '.join(scaling_rss.PROBES)}; --limits takes two or more sizes")
        report = scaling_rss.run(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "scaling_rss.json").write_text(json.dumps(report, indent=1))
        return
    sizes = [int(x) for x in (args.sizes or ("25,100,400" if args.quick else "100,400,1600")).split(",")]
    lengths = [int(x) for x in (args.lengths or "64,256,1024").split(",")]
    budget = args.budget or (2048 if args.quick else 16384)
    started = time.perf_counter()
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="probecache-scaling-", dir=args.scratch))  # ours alone to delete
    try:
        # One-time costs of the process (imports inside the stages, the converted model's page cache) fall on
        # a discarded 8-example extraction, not on the first point.
        warm = extract(ExtractConfig(dataset="rotten_tomatoes", limit=8, model=args.model, dtype=args.dtype,
                                     device=args.device, root=str(scratch / "warm-up"), progress=False))
        shutil.rmtree(warm.store_path)
        size_points, size_fits = size_sweep(args, sizes, scratch)
        length_points, length_fits = length_sweep(args, lengths, budget, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "model": args.model, "dtype": args.dtype, "device": args.device, "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "quick": args.quick, "length_budget_tokens": budget,
        "warm_up_extract_wall_s": warm.wall_seconds, "sizes": size_points, "size_fits": size_fits,
        "lengths": length_points, "length_fits": length_fits, "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    print(f"scaling benchmark: {args.model} ({args.dtype}, {torch.get_num_threads()} torch threads), "
          f"{report['wall_s']:.0f} s wall\n\nExamples (rotten_tomatoes, ~25 tokens each):\n")
    print(size_table(size_points))
    print(f"\nSequence length ({budget:,} tokens per point, documents of exactly T tokens):\n")
    print(length_table(length_points))
    print("\nFits:\n" + "\n".join(fit_lines(size_fits, length_fits, lengths)))


if __name__ == "__main__":
    main()
