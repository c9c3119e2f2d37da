"""`probecache store convert SRC [--tier T] [--layers L] [--tokens P]`: a new content-addressed store from an
existing one, no LLM: re-encoded at another value tier, and/or cut to a layer subset or a token policy.

The destination is exactly the store `extract --tier T --layers L --tokens P` with the same options would write:
its identity is the source's with the tier replaced by the one rule extraction uses (tiers.with_tier) and the
layers and token policy set as extraction sets them, so it gets the same store id,
and each shard goes through the same SegmentWriter path (mantissa rounding and its recomputed means, the
writer's quantization, ``last`` taken from the states the writer is given) and the same commit
(shard_commit.commit_shard). Hence only a lossless source: a lossy one no longer holds the values extraction
would quantize, and "converting" it to lossless would pretend to be exact. A token policy needs a source that
kept every token; the means stay the source's (over every token), as extraction pools before dropping tokens.

Resumable like extract: plan.parquet and store.json are create-if-absent, a shard whose part the destination has
is skipped, and an attempt killed before its part is written leaves an orphan segment for `gc`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from probecache.manifests.schema import part_bytes, read_part

from .codecs import round_example
from .commit import create_if_absent
from .errors import StoreError
from .faults import crash_point
from .header import seal_header
from .layers import Layers
from .layout import StoreLayout, new_attempt_id, store_id_for
from .lease import LeaseKeeper
from .prefixes import MAX_SOURCES, example_ranges
from .reader import Store, open_store
from .roots import LocalRoot
from .segment import TOKENS_PER_ZARR_SHARD, SegmentShape, SegmentWriter
from .shard_commit import commit_shard
from .tiers import Tier, parse_tier, with_tier
from .token_policy import TokenPolicy, parse_token_policy

READ_TOKENS = 4 * TOKENS_PER_ZARR_SHARD  # source tokens read at a time: whole zarr shards, bounded memory


@dataclass(frozen=True)
class Conversion:
    """What the destination store holds: its value tier, model layers (ascending) and token policy."""

    tier: Tier
    layers: list[int]
    tokens: TokenPolicy

    @classmethod
    def of(cls, src: Store, tier: str | Tier | None = None, layers: Layers = None,
           tokens: str | TokenPolicy | None = None) -> Conversion:
        """The conversion asked for: None keeps the source's tier, layers or token policy."""
        return cls(tier=src.tier if tier is None else parse_tier(tier) if isinstance(tier, str) else tier,
                   layers=sorted(set(src.select_layers(layers))),  # a layer the source lacks: one line
                   tokens=src.token_policy if tokens is None else
                   parse_token_policy(tokens) if isinstance(tokens, str) else tokens)


def converted_header(info: dict, conversion: Conversion) -> dict:
    """The destination's store.json fields: the source's, with the tier, layers and token policy (identity, store
    id) set by the rules extraction uses."""
    capture = {k: v for k, v in info["capture"].items() if k != "tokens"}
    if not conversion.tokens.keeps_all:
        capture["tokens"] = conversion.tokens.name
        capture.pop("shared_prefixes", None)  # --share-prefixes needs every token: extraction would refuse both
    n_layers = info["model"]["n_layers"]
    identity = {**with_tier(info["identity"], conversion.tier), "capture": capture,
                "layers": "all" if conversion.layers == list(range(n_layers)) else conversion.layers}
    store_id = store_id_for(identity, info["dataset"]["name"])
    provenance = {**info.get("provenance", {}), "converted_from": info["store_id"]}
    header = {k: v for k, v in info.items() if k != "sha256"}
    return {**header, "store_id": store_id, "identity": identity, "tier": conversion.tier.name, "capture": capture,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "provenance": provenance}


def check_convertible(src: Store, conversion: Conversion, partial: bool) -> None:
    """One-line StoreError for a conversion that would not equal a direct extraction."""
    tier = conversion.tier
    if conversion.tokens != src.token_policy and not src.token_policy.keeps_all:
        raise StoreError(f"{src.path} keeps --tokens {src.token_policy.name}: a token policy can only be applied to "
                         "a store that kept every token; convert from that store or re-extract")
    if src.tier.name != "lossless":
        raise StoreError(f"{src.path} is stored {src.tier.name} (lossy): converting it to {tier.name} cannot give "
                         "the values extraction would store; convert from the lossless store or re-extract")
    if tier.kind == "mantissa" and src.logical_dtype != "bfloat16":
        raise StoreError(f"--tier {tier.name} rounds bf16 values and {src.path} is {src.logical_dtype}: "
                         "use an fp8 or int tier")
    done, planned = len(src.layout.committed_shards()), int(src.info["plan"]["n_shards"])
    if done < planned and not partial:
        raise StoreError(f"{src.path} is incomplete ({done}/{planned} shards committed): finish its extraction "
                         "(rerun the extract command) or pass --partial to convert the committed shards")


def convert_store(src_path: str | Path, root: str | Path, tier: str | Tier | None = None, partial: bool = False,
                  progress: Callable[[int, bool], None] | None = None, layers: Layers = None,
                  tokens: str | TokenPolicy | None = None) -> Path:
    """Write ``src`` re-encoded at ``tier``, cut to ``layers`` and ``tokens`` (None: as the source) under ``root``
    (see the module docstring); returns the new store's path. ``progress(shard_id, converted)`` is called once per
    committed source shard."""
    src = open_store(src_path)
    conversion = Conversion.of(src, tier, layers, tokens)
    check_convertible(src, conversion, partial)
    header = converted_header(src.info, conversion)
    layout = StoreLayout(Path(root) / header["store_id"])
    if layout.path.resolve() == src.path.resolve():
        raise StoreError(f"{src.path} already holds {conversion.tier.name} values of those layers and tokens: "
                         "nothing to convert")
    layout.path.mkdir(parents=True, exist_ok=True)
    create_if_absent(layout.plan, src.layout.plan.read_bytes())
    crash_point("plan-written")
    layout.manifests.mkdir(parents=True, exist_ok=True)
    if not create_if_absent(layout.store_json, seal_header(header)):
        existing = json.loads(layout.store_json.read_bytes())
        if existing.get("identity") != header["identity"] or existing.get("plan") != header["plan"]:
            raise StoreError(f"{layout.path} holds a different store under this id: move it away or use another --root")
    crash_point("header-written")
    leases = LeaseKeeper(LocalRoot(layout.path))
    try:
        for shard_id in sorted(src.layout.committed_shards()):
            converted = not layout.part(shard_id).exists() and _convert_shard(src, layout, header, conversion,
                                                                                shard_id, leases)
            if progress is not None:
                progress(shard_id, converted)
    finally:
        leases.close()
    return layout.path


def _convert_shard(src: Store, layout: StoreLayout, header: dict, conversion: Conversion, shard_id: int,
                   leases: LeaseKeeper) -> bool:
    """One shard: lease, re-encode through SegmentWriter, commit. False when another attempt committed it first."""
    started = time.time()
    table, src_stats = read_part(src.layout.part(shard_id))
    rows = sorted(table.to_pylist(), key=lambda r: r["row"])  # row order = token order in the segment
    source_segment = src_stats["segment"]
    segment = layout.segment_name(shard_id, new_attempt_id())
    leases.hold(segment)  # before the segment's first byte: gc never sees it unleased
    capture, tier, layers, policy = header["capture"], conversion.tier, conversion.layers, conversion.tokens
    cut_tokens = policy != src.token_policy  # only from a store that kept every token (check_convertible)
    # a sharing source's decisions carry over (made on unrounded values, so they are every tier's: prefixes.py)
    share = bool(capture.get("shared_prefixes"))
    writer = SegmentWriter(layout.segment(segment), SegmentShape(
        n_layers=len(layers), hidden_size=src.hidden_size,
        n_tokens=sum(policy.count(r["n_tokens"]) if cut_tokens else r["n_tokens"] for r in rows),
        n_examples=len(rows), logical_dtype=src.logical_dtype,
        vocab_size=header["model"]["vocab_size"] if capture.get("logits") else None,
        token_ids=bool(capture.get("token_ids")), tier=tier.name,
        layer_indices=None if header["identity"]["layers"] == "all" else tuple(layers), tokens=policy.name,
        share_prefixes=share,
    ), store_id=header["store_id"], shard_id=shard_id)
    prefixes: dict[tuple[int, int], np.ndarray] = {}  # (offset, tokens) -> (L', s, d): shared prefixes read once
    means = src.read_pooled(source_segment, "mean", layers, decode=False)  # (N, L', d) float32
    logits = src.segment_array(source_segment, "logits")[:] if capture.get("logits") else None  # (N, V)
    token_ids = src.segment_array(source_segment, "token_ids")[:] if capture.get("token_ids") else None  # (T,)
    window, window_start = None, 0
    for r in rows:
        *prefix, (lo, hi) = example_ranges(r["token_offset"], r["n_tokens"], r.get("prefix_offset") or 0,
                                           r.get("prefix_tokens") or 0)  # [(po, po + s)], its own [lo, hi)
        if window is None or hi > window_start + window.shape[1] or lo < window_start:
            window_start = lo
            window = src.read_tokens(source_segment, lo, max(hi, lo + READ_TOKENS), layers, decode=False)  # (L', n', d)
        states = window[:, lo - window_start : hi - window_start]  # (L', n, d) stored values
        ids = None if token_ids is None else token_ids[lo:hi]  # (n,)
        if prefix:  # the whole example, as extraction saw it: the shared prefix then its own tokens
            if prefix[0] not in prefixes:
                if len(prefixes) >= MAX_SOURCES:  # as many as extraction could have referenced at once
                    prefixes.pop(next(iter(prefixes)))
                prefixes[prefix[0]] = src.read_tokens(source_segment, *prefix[0], layers, decode=False)
            states = np.concatenate([prefixes[prefix[0]], states], axis=1)  # (L', n_tokens, d)
            ids = None if ids is None else np.concatenate([token_ids[slice(*prefix[0])], ids])
        mean = means[r["row"]]  # (L', d)
        if tier.mantissa_bits is not None:  # the rounding and recomputed mean extraction does, over every token
            states, mean = round_example(states, tier.mantissa_bits)
        if cut_tokens:  # then the kept positions, as extraction keeps them
            keep = policy.positions(len(states[0])).numpy()  # (n_kept,)
            states = [h[keep] for h in states]  # L' x (n_kept, d)
            ids = None if ids is None else ids[keep]
        n_kept, skip = len(states[0]), (r.get("prefix_tokens") or 0) if share else 0
        if skip:  # the destination appends the same own tokens in the same order: prefix_offset stays right
            states, ids = [h[skip:] for h in states], None if ids is None else ids[skip:]
        r["row"], r["token_offset"] = writer.append(states, mean, None if logits is None else logits[r["row"]], ids)
        r["n_tokens"] = n_kept
        if not share:  # a sharing source cut to a token policy: every example whole, no prefix columns
            r.pop("prefix_offset", None)
            r.pop("prefix_tokens", None)
        crash_point("writer-append")
    bytes_stored = writer.close()
    crash_point("segment-closed")
    stats = {**writer.commit_stats(shard_id, segment, src_stats.get("padded_tokens", writer.shape.n_tokens), started,
                                   bytes_stored), "converted_from": source_segment}
    for r in rows:
        r["segment"] = segment
        if "store_id" in r:
            r["store_id"] = header["store_id"]
    summary = {k: v for k, v in stats.items() if k != "files"}
    outcome = commit_shard(LocalRoot(layout.path), shard_id, segment, writer.files,
                           part_bytes(rows, stats, "text" in table.column_names, share),
                           json.dumps(summary, indent=1).encode(), leases)
    leases.release(segment)
    if outcome.damage is not None:
        raise StoreError(f"{layout.path}: {outcome.damage} while converting shard {shard_id}: rerun the command")
    if outcome.committed:
        crash_point("shard-committed")
    return outcome.committed


__all__ = ["Conversion", "check_convertible", "convert_store", "converted_header"]
