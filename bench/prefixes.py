"""Shared-prefix dedup (``extract --share-prefixes``, store/prefixes.py) against a plain store, side by side.

The same chat-format examples (``--prompt-format chat``: SmolLM2's template opens every prompt with the same
system prompt) extracted with and without sharing, in alternating order, best of ``--repeats`` each:

  1. bytes: hidden bytes on disk per example token, whole segments per token, and the ratio plain / shared;
  2. what was shared: the share of tokens stored once, examples sharing, and how often bit comparison cut a
     share short where the token ids still matched (``stopped_by_bits``: batches whose kernels rounded the same
     prefix differently);
  3. extraction time ratio (shared / plain) and loader throughput ratio (one TokenStream epoch over the train
     split at ``--layers``, best of ``--repeats`` rounds visiting the stores in turn); the batches of both stores
     are checked torch.equal on the first round.

    python bench/prefixes.py                      # 1,000 Rotten Tomatoes reviews, SmolLM2-135M bf16, CPU
    python bench/prefixes.py --quick              # 300 reviews, 1 repeat
    python bench/prefixes.py --instruction        # each review behind the same fixed instruction (~190 tokens)

``--instruction`` is the case the dedup is for: a classifier prompt that puts a fixed task description (a policy, a
rubric, few-shot examples) in front of every text. The plain store then repeats a prefix longer than a 256-token
zarr chunk's worth of matches zstd can find, and sharing stores it once per shard.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from probecache.extract import shard as extract_shard  # noqa: E402
from probecache.extract.config import ExtractConfig  # noqa: E402
from probecache.extract.run import extract  # noqa: E402
from probecache.manifests.schema import committed_part_files, part_stats  # noqa: E402
from probecache.store.prefixes import PrefixMatcher  # noqa: E402
from probecache.store.reader import open_store  # noqa: E402
from probecache.train.loaders import TokenStream  # noqa: E402

# A fixed task description of the kind a classifier prompt puts before every text (written for this benchmark)
INSTRUCTION = (
    "You are a careful film critic's assistant. Your task is to read one short movie review and decide whether "
    "the reviewer's overall opinion of the film is positive or negative. Read the whole review before deciding. "
    "Guidelines: 1. Judge the reviewer's opinion of the film, not the events of its plot; a sad story can get a "
    "glowing review. 2. Sarcasm and irony are common: 'a masterpiece of boredom' is negative. 3. Mixed reviews "
    "are decided by the final verdict, usually in the last sentence. 4. Praise for one actor in an otherwise "
    "dismissive review is still a negative review. 5. Comparisons to other films count only as far as they say "
    "whether this film is good. 6. Ignore spelling mistakes, slang and missing punctuation. 7. If the review is "
    "mostly a summary, look for the adjectives the reviewer chooses. Answer with exactly one word, positive or "
    "negative, and nothing else.\n\nReview: ")
MATCHERS: list[PrefixMatcher] = []  # every segment's matcher of the sharing extractions, for its counters


class CountingMatcher(PrefixMatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        MATCHERS.append(self)


def store_stats(path: Path) -> dict:
    stats = [part_stats(p) for p in committed_part_files(path / "manifests")]
    total = {k: sum(s.get(k, 0) for s in stats) for k in ("n_tokens", "n_examples", "hidden_bytes_stored",
                                                            "bytes_stored")}
    total["stored_tokens"] = sum(s.get("stored_tokens", s["n_tokens"]) for s in stats)
    return total


def loader_rates(stores: dict, layers: str, repeats: int) -> dict[str, float]:
    streams = {name: TokenStream(store, "train", layers=layers, batch_size=32, seed=0)
               for name, store in stores.items()}
    best = dict.fromkeys(streams, float("inf"))
    tokens = {}
    for epoch in range(repeats):
        batches = {}
        for name, stream in streams.items():
            started = time.perf_counter()
            kept = [] if epoch == 0 else None
            count = 0
            for batch in stream.epoch(epoch):
                count += int(batch.mask.sum())
                if kept is not None:
                    kept.append(batch)
            best[name] = min(best[name], time.perf_counter() - started)
            tokens[name] = count
            batches[name] = kept
        if epoch == 0:  # the point of the exercise: what training sees is identical
            for a, b in zip(batches["plain"], batches["shared"], strict=True):
                assert a.example_ids == b.example_ids and torch.equal(a.hidden, b.hidden), "batches differ"
    return {name: tokens[name] / best[name] for name in streams}


def instructed_csv(name: str, path: Path) -> str:
    """The dataset's examples with INSTRUCTION before each text, as a csv: dataset (same ids, labels, splits)."""
    import csv

    from probecache.extract.datasets import load_dataset

    data = load_dataset(name)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "text", "label", "split"])
        for split, examples in data.splits.items():
            for e in examples:
                out.writerow([e.example_id, INSTRUCTION + e.text, data.label_names[e.label], split])
    return f"csv:{path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="rotten_tomatoes")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layers", default="8,16,24", help="the loader's layers")
    ap.add_argument("--quick", action="store_true", help="300 examples, 1 repeat")
    ap.add_argument("--instruction", action="store_true",
                    help="put the same fixed instruction (~190 tokens) before every text (a csv: dataset)")
    args = ap.parse_args()
    if args.quick:
        args.limit, args.repeats = 300, 1
    extract_shard.PrefixMatcher = CountingMatcher  # count what the sharing extractions decided
    root = Path(tempfile.mkdtemp(prefix="prefixes-"))
    dataset = instructed_csv(args.dataset, root / "instructed.csv") if args.instruction else args.dataset
    base = dict(dataset=dataset, limit=args.limit, model=args.model, dtype="bf16", device="cpu",
                prompt_format="chat", progress=False)
    try:
        extract(ExtractConfig(**{**base, "limit": min(args.limit, 64)}, root=str(root / "warm-up")))  # one-off costs
        best, paths = {"plain": float("inf"), "shared": float("inf")}, {}
        for again in range(args.repeats):
            for name in ("plain", "shared") if again % 2 == 0 else ("shared", "plain"):
                if name in paths:
                    shutil.rmtree(paths[name])
                MATCHERS.clear()
                started = time.perf_counter()
                paths[name] = extract(ExtractConfig(**base, root=str(root / f"{name}-{again}"),
                                                    share_prefixes=name == "shared")).store_path
                best[name] = min(best[name], time.perf_counter() - started)
                if name == "shared":
                    decided = {k: sum(getattr(m, k) for m in MATCHERS)
                               for k in ("shared_examples", "shared_tokens", "stopped_by_bits")}
        stats = {name: store_stats(path) for name, path in paths.items()}
        stores = {name: open_store(path) for name, path in paths.items()}
        rates = loader_rates(stores, args.layers, max(args.repeats, 3))
        plain, shared = stats["plain"], stats["shared"]
        n = plain["n_tokens"]
        behind = " behind a fixed instruction" if args.instruction else ""
        print(f"{args.dataset}{behind}, {args.model} bf16, chat format, {plain['n_examples']} examples, {n:,} tokens "
              f"({n / plain['n_examples']:.1f} per example); best of {args.repeats}")
        print(f"shared: {decided['shared_examples']} examples share a prefix, {decided['shared_tokens']:,} tokens "
              f"({decided['shared_tokens'] / n:.1%}) stored once; stored tokens {shared['stored_tokens']:,}; "
              f"shares cut short by a bit mismatch: {decided['stopped_by_bits']}")
        for name, s in stats.items():
            print(f"{name}: hidden {s['hidden_bytes_stored'] / n:,.0f} B per example token, whole segments "
                  f"{s['bytes_stored'] / n:,.0f} B/token; extraction {best[name]:.2f} s; loader "
                  f"{rates[name]:,.0f} tokens/s (layers {args.layers})")
        print(f"plain / shared: hidden bytes {plain['hidden_bytes_stored'] / shared['hidden_bytes_stored']:.2f}x, "
              f"segment bytes {plain['bytes_stored'] / shared['bytes_stored']:.2f}x, tokens stored "
              f"{plain['stored_tokens'] / shared['stored_tokens']:.2f}x; extraction time shared / plain "
              f"{best['shared'] / best['plain']:.3f}; loader tokens/s shared / plain "
              f"{rates['shared'] / rates['plain']:.3f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
