"""`bench/scaling.py --rss`: training memory and speed at x1 / x4 / x16 store sizes (issue 13).

Per size, one store of the same dataset (``--limit`` scaled; kept under ``--stores`` and reused when present,
deleted at the end unless ``--keep``), then each measurement in a fresh child process, so every peak RSS is
that process's own kernel high-water mark (VmHWM) and nothing one run allocated or cached carries over:

- one epoch (``fit_shared``: the train read and steps, then the validation pass) of the scoring probe and of
  MHA/8, through the token stream with a shuffle buffer much smaller than the smallest store: peak RSS, RSS
  after set-up (imports, store open, probe), tokens/s, and the stream's own ``peak_held_tokens``;
- loader / raw decompression: tokens/s of the training token stream over tokens/s of just decoding the same
  segments (bench/train.py's ``raw_decode_seconds``), interleaved A B B A;
- one probe at parity (issue 13, item 3): the scoring epoch from the store, from the store through a decoded
  cache (store/decoded_cache.py; built by one epoch first, timed), and from one ``torch.save`` file per example
  holding the probe's layers (bench/baseline_formats.py's reader and batches), written from the store into
  scratch and deleted after; ``--parity-repeats`` interleaved repeats, each source's files dropped from the page
  cache before its epoch with ``--cold``: seconds per epoch over torch.save's.

Flat means: peak RSS at x4 and x16 within 10% of x1 (the issue's criterion), and tokens/s per epoch flat too
(no per-example opens or manifest scans: tests/train/test_memory_bound.py counts them).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import disk_bytes, evict_from_page_cache  # bench/common.py (bench/ is on sys.path)

PROBES = {"scoring": {}, "mha": {"downcast": 8}}
BYTES_PER_TOKEN_BF16 = 2


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: the RSS benchmark needs Linux")


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024  # MemTotal: kB


# ---- child processes: one measurement each ----------------------------------------------------------------


def child_epoch(store_path: str, probe: str, buffer_tokens: int, source: str, layers: str = "all") -> dict:
    """One epoch of ``probe`` from the store's token stream (``source`` "store"), from it through a decoded cache
    ("cache=FOLDER"), or (``source`` = a folder) from torch.save files holding the probe's layers; ``layers``: the
    probe's layers in the store's layer grammar."""
    from probecache.store.decoded_cache import DecodedCache
    from probecache.store.reader import open_store
    from probecache.train.data import TokenBatches, labels_of, resolve_splits, split_examples
    from probecache.train.probes import ProbeConfig
    from probecache.train.sweep import auto_heads
    from probecache.train.trainer import TrainConfig, Variant, fit_shared

    torch.manual_seed(0)
    cache = DecodedCache(Path(source.split("=", 1)[1]), 1 << 50) if source.startswith("cache=") else None
    store = open_store(store_path, decoded_cache=cache)
    splits = resolve_splits(store)
    counts = np.bincount(labels_of(store, splits.train), minlength=len(store.label_names))
    d = store.hidden_size
    layer_list = store.select_layers(layers)
    downcast = PROBES[probe].get("downcast", 32)
    variant = Variant(ProbeConfig(probe, len(layer_list), d, len(store.label_names), downcast=downcast,
                                  heads=auto_heads(d // downcast), norm="rms"),
                      TrainConfig(lr=1e-3, epochs=1, patience=1, seed=0))
    from_store = source == "store" or cache is not None
    if from_store:
        train = TokenBatches(store, splits.train, layer_list, 32, True, seed=0, buffer_tokens=buffer_tokens)
        val = TokenBatches(store, splits.validation, layer_list, 32, False, buffer_tokens=buffer_tokens)
    else:
        from baseline_formats import ReaderBatches, TorchSaveReader

        reader = TorchSaveReader(Path(source))
        train = ReaderBatches(reader, *split_examples(store, splits.train), 32, True, seed=0)
        val = ReaderBatches(reader, *split_examples(store, splits.validation), 32, False)
    table = store.manifest(columns=["example_id", "n_tokens"])
    n_tokens = dict(zip(table["example_id"].to_pylist(), table["n_tokens"].to_pylist(), strict=True))
    tokens = sum(n_tokens[e] for spec in (splits.train, splits.validation) for e in split_examples(store, spec)[0])
    base_kib = _status_kib("VmRSS")
    train, val = LargestBatch(train), LargestBatch(val)
    started = time.perf_counter()
    fit_shared([variant], train, val, "accuracy", counts, progress=False)
    seconds = time.perf_counter() - started
    out = {"epoch_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
           "base_rss_mb": base_kib / 1024, "peak_rss_mb": _status_kib("VmHWM") / 1024,
           "largest_batch_token_slots": max(train.largest, val.largest)}
    from probecache.train import memory

    out["heap_trims"] = memory.trims  # the heap guard's malloc_trim calls in this child (train/memory.py)
    if cache is not None:
        out["cache"] = {"hits": cache.stats.hits, "written": cache.stats.written, "skipped": cache.stats.skipped}
    if from_store:
        out["peak_held_tokens"] = max(train.source.stream.peak_held_tokens, val.source.stream.peak_held_tokens)
        out["peak_buffered_tokens"] = train.source.stream.peak_buffered_tokens
        out["peak_arena_mb"] = max(train.source.stream.peak_arena_bytes, val.source.stream.peak_arena_bytes) / 1e6
    return out


class LargestBatch:
    """A batch source passing batches through and recording the largest B x T_max: the probe's activations (and
    so most of an epoch's RSS) follow it, and a larger store can hold a longer longest example."""

    def __init__(self, source):
        self.source, self.n_batches, self.largest = source, source.n_batches, 0

    def epoch(self, epoch: int):
        for batch in self.source.epoch(epoch):
            self.largest = max(self.largest, batch.mask.numel())
            yield batch


def child_loader(store_path: str, buffer_tokens: int, repeats: int, layers: str = "all") -> dict:
    """Loader / raw decompression of the train split, interleaved raw, loader, loader, raw per repeat."""
    from probecache.store.reader import open_store
    from probecache.train.data import resolve_splits
    from probecache.train.loaders import TokenStream

    from train import raw_decode_seconds  # bench/train.py

    store = open_store(store_path)
    splits = resolve_splits(store)
    raw, loader = [], []
    for r in range(repeats):
        for name in ("raw", "loader", "loader", "raw"):
            if name == "raw":
                seconds, tokens = raw_decode_seconds(store, splits.train.split, store.select_layers(layers))
                raw.append(tokens / seconds)
            else:
                stream = TokenStream(store, splits.train.split, layers=layers, batch_size=32, seed=0,
                                     buffer_tokens=buffer_tokens, dtype=None, ids=splits.train.ids)
                started = time.perf_counter()
                tokens = sum(int(b.mask.sum()) for b in stream.epoch(r))
                loader.append(tokens / (time.perf_counter() - started))
    return {"raw_tokens_per_s": statistics.median(raw), "loader_tokens_per_s": statistics.median(loader),
            "ratios": [a / b for a, b in zip(loader, raw, strict=True)],
            "ratio": statistics.median(a / b for a, b in zip(loader, raw, strict=True)),
            "peak_rss_mb": _status_kib("VmHWM") / 1024}


def run_child(*args: str) -> dict:
    env = dict(os.environ)
    for name, value in (("ARROW_DEFAULT_MEMORY_POOL", "system"), ("OMP_WAIT_POLICY", "PASSIVE")):
        env.setdefault(name, value)  # as the CLI sets them (probecache/cli.py)
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the parent: stores, torch.save copies, the table ------------------------------------------------------


def write_torch_save(store, folder: Path, layers: str = "all") -> int:
    """One torch.save file per train / validation example (bf16, (L', n, d): the probe's layers, the most a
    per-example file layout can leave out), as TorchSaveWriter writes them; read segment by segment (one
    contiguous read each). Returns bytes on disk."""
    from probecache.train.data import resolve_splits, split_examples

    splits = resolve_splits(store)
    wanted = set(split_examples(store, splits.train)[0]) | set(split_examples(store, splits.validation)[0])
    table = store.manifest(columns=["example_id", "segment", "token_offset", "n_tokens"])
    rows = [r for r in zip(*(table[c].to_pylist() for c in ("example_id", "segment", "token_offset", "n_tokens")),
                           strict=True) if r[0] in wanted]
    folder.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for segment in dict.fromkeys(r[1] for r in rows):
        block = store.read_tokens(segment, layers=layers)  # (L', T_segment, d) bf16
        for eid, seg, offset, n in rows:
            if seg == segment:
                torch.save(block[:, offset : offset + n].clone(), folder / f"{len(ids):06d}.pt")  # (L', n, d)
                ids.append(eid)
    (folder / "index.json").write_text(json.dumps(ids))
    return disk_bytes(folder)[0]


def measure_size(args, limit: int, stores: Path, scratch: Path) -> dict:
    from probecache.extract.config import ExtractConfig
    from probecache.extract.run import extract
    from probecache.store.reader import open_store

    config = ExtractConfig(dataset=args.dataset, data_dir=args.data_dir, limit=limit, model=args.model,
                           dtype="auto", device="auto", root=str(stores), shard_size=args.shard_size,
                           max_tokens=args.max_tokens, progress=False)
    started = time.perf_counter()
    result = extract(config)  # a cache hit when the store is already there (same config, same store_id)
    extract_s = time.perf_counter() - started
    store = open_store(result.store_path)
    summary = store.summary()
    size = disk_bytes(store.path)[0]
    point = {"limit": limit, "store": str(store.path), "examples": summary["n_examples"], "store_bytes": size,
             "x_ram": size / mem_total_bytes(), "extract_s": extract_s, "segments": len(store.segments()),
             "train_tokens": int(sum(store.manifest(split="train", columns=["n_tokens"])["n_tokens"].to_pylist()))}
    log(f"x{limit}: store {size / 1e9:.2f} GB, {point['segments']} segments, extract {extract_s:.0f} s")
    for probe in args.probes:
        point[probe] = run_child("epoch", str(store.path), probe, str(args.buffer_tokens), "store", args.layers)
        log(f"  {probe}: peak RSS {point[probe]['peak_rss_mb']:,.0f} MB, {point[probe]['tokens_per_s']:,.0f} tok/s")
    point["loader"] = run_child("loader", str(store.path), str(args.buffer_tokens), str(args.repeats), args.layers)
    log(f"  loader / raw {point['loader']['ratio']:.3f}")
    if "scoring" in args.probes and not args.no_torch_save:
        point["parity"] = measure_parity(args, store, scratch / f"parity-{limit}")
    if not args.keep:
        shutil.rmtree(store.path)
    return point


def measure_parity(args, store, scratch: Path) -> dict:
    """One scoring epoch from the store, from its decoded cache and from torch.save files of the same layers,
    interleaved (the order rotates per repeat); ``--cold`` drops each source's files from the page cache first."""
    folders = {"torch_save": scratch / "torch-save", "cache": scratch / "decoded"}
    out = {"torch_save_bytes": write_torch_save(store, folders["torch_save"], args.layers)}
    try:
        started = time.perf_counter()
        build = run_child("epoch", str(store.path), "scoring", str(args.buffer_tokens), f"cache={folders['cache']}",
                          args.layers)  # the first epoch decodes from the store and keeps the blocks
        out.update(cache_build=build, cache_build_wall_s=time.perf_counter() - started,
                   cache_bytes=disk_bytes(folders["cache"])[0])
        sources = {"store": "store", "cache": f"cache={folders['cache']}", "torch_save": str(folders["torch_save"])}
        files = {"store": store.path / "segments", **folders}
        names = list(sources)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.parity_repeats):
            for name in names[r % 3:] + names[: r % 3]:
                if args.cold:
                    evict_from_page_cache(files[name])
                runs[name].append(run_child("epoch", str(store.path), "scoring", str(args.buffer_tokens),
                                            sources[name], args.layers))
        for name in names:
            out[name] = {"epoch_s": [x["epoch_s"] for x in runs[name]],
                         "median_s": statistics.median(x["epoch_s"] for x in runs[name]),
                         "peak_rss_mb": max(x["peak_rss_mb"] for x in runs[name])}
        out["cache"]["written"] = sum(x["cache"]["written"] for x in runs["cache"])  # 0: every block came from it
        out["ratios"] = {name: [a / b for a, b in zip(out[name]["epoch_s"], out["torch_save"]["epoch_s"],
                                                        strict=True)] for name in ("store", "cache")}
        log(f"  scoring epoch s: store {out['store']['median_s']:.1f}, decoded cache {out['cache']['median_s']:.1f} "
            f"(built in {build['epoch_s']:.1f}), torch.save {out['torch_save']['median_s']:.1f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def log(message: str) -> None:
    print(f"[scaling --rss] {message}", file=sys.stderr, flush=True)


def table(points: list[dict], probes: list[str]) -> str:
    first = points[0]
    rows = [
        ("examples (train tokens)", [f"{p['examples']:,} ({p['train_tokens']:,})" for p in points]),
        ("store GB on disk (x RAM)", [f"{p['store_bytes'] / 1e9:.2f} ({p['x_ram']:.3f})" for p in points]),
        ("segments", [str(p["segments"]) for p in points]),
    ]
    for probe in probes:
        label = "MHA/8" if probe == "mha" else probe
        rows += [
            (f"{label}: peak RSS MB (after set-up MB)",
             [f"{p[probe]['peak_rss_mb']:,.0f} ({p[probe]['base_rss_mb']:,.0f})" for p in points]),
            (f"{label}: peak RSS vs x1", [f"{p[probe]['peak_rss_mb'] / first[probe]['peak_rss_mb']:.3f}"
                                          for p in points]),
            (f"{label}: peak RSS growth in the epoch MB",
             [f"+{p[probe]['peak_rss_mb'] - p[probe]['base_rss_mb']:,.0f}" for p in points]),
            (f"{label}: tokens/s (vs x1)", [f"{p[probe]['tokens_per_s']:,.0f} "
                                            f"({p[probe]['tokens_per_s'] / first[probe]['tokens_per_s']:.2f})"
                                            for p in points]),
            (f"{label}: stream's peak held tokens (its arena's pages in use, MB)",
             [f"{p[probe]['peak_held_tokens']:,} ({p[probe]['peak_arena_mb']:.0f})" for p in points]),
            (f"{label}: heap guard's trims in the epoch (train/memory.py)",
             [str(p[probe].get("heap_trims", "-")) for p in points]),
            (f"{label}: largest batch, token slots (B x T_max)",
             [f"{p[probe]['largest_batch_token_slots']:,}" for p in points]),
        ]
    rows.append(("loader / raw decompression (median)", [f"{p['loader']['ratio']:.3f}" for p in points]))
    if "parity" in first:
        def median_ratio(p: dict, name: str) -> str:
            q = p["parity"]
            return (f"{q[name]['median_s']:.1f} / {q['torch_save']['median_s']:.1f} = "
                    f"**{statistics.median(q['ratios'][name]):.2f}**")

        rows += [
            ("torch.save files GB (the probe's layers) / decoded cache GB",
             [f"{p['parity']['torch_save_bytes'] / 1e9:.2f} / {p['parity']['cache_bytes'] / 1e9:.2f}" for p in points]),
            ("scoring epoch s, median: store / torch.save", [median_ratio(p, "store") for p in points]),
            ("scoring epoch s, median: decoded cache / torch.save", [median_ratio(p, "cache") for p in points]),
            ("the epoch that builds the cache / a store epoch",
             [f"{p['parity']['cache_build']['epoch_s'] / p['parity']['store']['median_s']:.2f}" for p in points]),
            ("peak RSS MB: store / decoded cache / torch.save",
             [" / ".join(f"{p['parity'][n]['peak_rss_mb']:,.0f}" for n in ("store", "cache", "torch_save"))
              for p in points]),
        ]
    lines = ["| metric | " + " | ".join(f"x{p['limit'] / first['limit']:g}" for p in points) + " |",
             "|---" * (len(points) + 1) + "|"]
    return "\n".join(lines + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows])


def run(args) -> dict:
    stores = Path(args.stores)
    stores.mkdir(parents=True, exist_ok=True)
    scratch = stores / "scratch"
    points = []
    try:
        for limit in args.limits:
            points.append(measure_size(args, limit, stores, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep and stores.is_dir() and not any(stores.iterdir()):
            stores.rmdir()
    report = {"dataset": args.dataset, "shard_size": args.shard_size, "buffer_tokens": args.buffer_tokens,
              "mem_total_bytes": mem_total_bytes(), "points": points}
    print(f"\nScale ({args.dataset}, shards of {args.shard_size} examples, buffer {args.buffer_tokens:,} tokens, "
          f"{mem_total_bytes() / 2**30:.0f} GiB RAM):\n")
    print(table(points, args.probes))
    return report


if __name__ == "__main__":  # a child: `scaling_rss.py epoch STORE PROBE BUFFER SOURCE` | `loader STORE BUFFER REPEATS`
    kind, *rest = sys.argv[1:]
    if kind == "epoch":
        result = child_epoch(rest[0], rest[1], int(rest[2]), rest[3], *rest[4:])
    elif kind == "loader":
        result = child_loader(rest[0], int(rest[1]), int(rest[2]), *rest[3:])
    else:
        sys.exit(f"unknown child {kind!r}: run bench/scaling.py --rss")
    print(json.dumps(result))
