"""Turning a dataset into a deterministic plan: which examples, their token ids, shards and batches.

The plan is a pure function of (dataset content, tokenizer, config): rerunning it gives the same shards,
so an interrupted extraction resumes exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from probecache.lm.tokens import Tokenisation, encode
from probecache.store.integrity import plan_digest  # noqa: F401  (re-exported for callers)

from .config import ExtractConfig
from .datasets import Example


@dataclass(frozen=True)
class PlannedExample:
    example: Example
    shard_id: int
    token_ids: list[int]
    n_tokens_original: int

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def select_examples(splits: dict[str, list[Example]], limit: int | None, seed: int) -> list[Example]:
    """All examples in split order, or a deterministic sample of ``limit`` spread over splits by size.

    Each split gets a share proportional to its size, and within a split each label a share proportional to
    its count (largest remainder, at least one each when possible); within a (split, label) the sample is the
    examples with the smallest sha256("sample:" seed:id), kept in file order, so it does not depend on how the
    file is sorted. The "sample:" salt matters: carving validation/test out of a train file ranks each label by
    sha256(seed:id) too, so unsalted, train's lowest ranks sat just above each label's carve cut-off and small
    samples came out one-sided (limit 200 of Rotten Tomatoes: a validation split of one class).
    """
    if limit is None or limit >= sum(len(v) for v in splits.values()):
        return [e for examples in splits.values() for e in examples]
    quota = _shares({s: len(v) for s, v in splits.items()}, limit)
    chosen = []
    for s, examples in splits.items():
        by_label: dict[int, list[int]] = {}
        for i, e in enumerate(examples):
            by_label.setdefault(e.label, []).append(i)
        label_quota = _shares({k: len(v) for k, v in by_label.items()}, quota[s])
        keep: set[int] = set()
        for label, members in by_label.items():
            keep.update(sorted(members, key=lambda i: _rank(seed, examples[i].example_id))[: label_quota[label]])
        chosen += [e for i, e in enumerate(examples) if i in keep]
    return chosen


def _shares(sizes: dict, total: int) -> dict:
    """``total`` split over ``sizes`` in proportion (largest remainder), every key at least one if possible."""
    n = sum(sizes.values())
    exact = {k: total * v / n for k, v in sizes.items()}
    quota = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - quota[k], reverse=True)[: total - sum(quota.values())]:
        quota[k] += 1
    for k in sizes:  # keep every key represented when the total allows it
        if quota[k] == 0 and total >= len(sizes):
            donor = max(quota, key=quota.get)
            quota[donor] -= 1
            quota[k] += 1
    return quota


def _rank(seed: int, example_id: str) -> str:
    return hashlib.sha256(f"sample:{seed}:{example_id}".encode()).hexdigest()


def tokenisation_of(config: ExtractConfig) -> Tokenisation:
    """The config's tokenisation: what serving must reproduce (store.json records these three fields)."""
    return Tokenisation(config.prompt_format, config.truncation_side, config.max_tokens)


def make_plan(examples: list[Example], tokenizer, config: ExtractConfig) -> list[PlannedExample]:
    ids, lengths = encode([e.text for e in examples], tokenizer, tokenisation_of(config))
    return [
        PlannedExample(e, i // config.shard_size, token_ids, n)
        for i, (e, token_ids, n) in enumerate(zip(examples, ids, lengths, strict=True))
    ]


def plan_table(plan: list[PlannedExample]) -> pa.Table:
    """What plan.parquet holds. No token ids: they decode to the text, which stays out of stores."""
    return pa.table({
        "example_id": [p.example.example_id for p in plan],
        "split": [p.example.split for p in plan],
        "shard_id": pa.array([p.shard_id for p in plan], pa.int32()),
        "n_tokens": pa.array([p.n_tokens for p in plan], pa.int32()),
        "n_tokens_original": pa.array([p.n_tokens_original for p in plan], pa.int32()),
    })


def plan_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def batches(shard: list[PlannedExample], batch_tokens: int, max_batch_size: int,
            max_padding: float = 0.05) -> list[list[PlannedExample]]:
    """Length-bucketed batches: split by split, longest first, padded to each batch's own longest example.

    A batch grows while its padded size (count x longest) stays <= batch_tokens and its own padding stays
    <= max_padding of its padded tokens, so every batch (and the whole shard) wastes at most ~5% of the
    forward pass on padding. A single example longer than batch_tokens still forms its own batch.

    Batches never mix splits and a shard's splits come one after the other (in plan order): batches are
    written in this order, so each split's examples are one contiguous token range of the shard's segment,
    and a loader reading one split decodes only its chunks (a shard mixing splits used to be decoded whole
    for each split: 2.2x the validation tokens of the default store, bench/formats.py).
    """
    split_rank = {split: k for k, split in enumerate(dict.fromkeys(p.example.split for p in shard))}
    ordered = sorted(shard, key=lambda p: (split_rank[p.example.split], -p.n_tokens))  # stable: ties keep plan order
    out: list[list[PlannedExample]] = []
    real = 0  # real tokens in out[-1]
    for p in ordered:
        if out and out[-1][0].example.split == p.example.split:
            batch, longest = out[-1], out[-1][0].n_tokens
            padded = (len(batch) + 1) * longest
            if (len(batch) < max_batch_size and padded <= batch_tokens
                    and real + p.n_tokens >= (1 - max_padding) * padded):
                batch.append(p)
                real += p.n_tokens
                continue
        out.append([p])
        real = p.n_tokens
    return out
