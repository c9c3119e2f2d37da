"""`probecache store convert SRC --tier T`: a new content-addressed store from an existing one, no LLM.

The destination is exactly the store `extract --tier T` with the same options would write: its identity is the
source's with the tier replaced by the one rule extraction uses (tiers.with_tier), so it gets the same store id,
and each shard goes through the same SegmentWriter path (mantissa rounding and its recomputed means, the
writer's quantization, ``last`` taken from the states the writer is given) and the same commit
(shard_commit.commit_shard). Hence only a lossless source: a lossy one no longer holds the values extraction
would quantize, and "converting" it to lossless would pretend to be exact.

Resumable like extract: plan.parquet and store.json are create-if-absent, a shard whose part the destination has
is skipped, and an attempt killed before its part is written leaves an orphan segment for `gc`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from probecache.manifests.schema import part_bytes, read_part

from .codecs import round_example
from .commit import create_if_absent
from .errors import StoreError
from .faults import crash_point
from .header import seal_header
from .layout import StoreLayout, new_attempt_id, store_id_for
from .lease import LeaseKeeper
from .reader import Store, open_store
from .roots import LocalRoot
from .segment import TOKENS_PER_ZARR_SHARD, SegmentShape, SegmentWriter
from .shard_commit import commit_shard
from .tiers import Tier, parse_tier, with_tier

READ_TOKENS = 4 * TOKENS_PER_ZARR_SHARD  # source tokens read at a time: whole zarr shards, bounded memory


def converted_header(info: dict, tier: Tier) -> dict:
    """The destination's store.json fields: the source's, with the tier (identity, store id) replaced."""
    identity = with_tier(info["identity"], tier)
    store_id = store_id_for(identity, info["dataset"]["name"])
    provenance = {**info.get("provenance", {}), "converted_from": info["store_id"]}
    header = {k: v for k, v in info.items() if k != "sha256"}
    return {**header, "store_id": store_id, "identity": identity, "tier": tier.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "provenance": provenance}


def check_convertible(src: Store, tier: Tier, partial: bool) -> None:
    """One-line StoreError for a conversion that would not equal a direct extraction."""
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


def convert_store(src_path: str | Path, root: str | Path, tier: str | Tier, partial: bool = False,
                  progress: Callable[[int, bool], None] | None = None) -> Path:
    """Write ``src`` re-encoded at ``tier`` under ``root`` (see the module docstring); returns the new store's path.
    ``progress(shard_id, converted)`` is called once per committed source shard."""
    tier = parse_tier(tier) if isinstance(tier, str) else tier
    src = open_store(src_path)
    check_convertible(src, tier, partial)
    header = converted_header(src.info, tier)
    layout = StoreLayout(Path(root) / header["store_id"])
    if layout.path.resolve() == src.path.resolve():
        raise StoreError(f"{src.path} is already stored {tier.name}: nothing to convert")
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
            converted = not layout.part(shard_id).exists() and _convert_shard(src, layout, header, tier, shard_id,
                                                                                leases)
            if progress is not None:
                progress(shard_id, converted)
    finally:
        leases.close()
    return layout.path


def _convert_shard(src: Store, layout: StoreLayout, header: dict, tier: Tier, shard_id: int,
                   leases: LeaseKeeper) -> bool:
    """One shard: lease, re-encode through SegmentWriter, commit. False when another attempt committed it first."""
    started = time.time()
    table, src_stats = read_part(src.layout.part(shard_id))
    rows = sorted(table.to_pylist(), key=lambda r: r["row"])  # row order = token order in the segment
    source_segment = src_stats["segment"]
    segment = layout.segment_name(shard_id, new_attempt_id())
    leases.hold(segment)  # before the segment's first byte: gc never sees it unleased
    capture = header["capture"]
    writer = SegmentWriter(layout.segment(segment), SegmentShape(
        n_layers=src.n_layers, hidden_size=src.hidden_size, n_tokens=sum(r["n_tokens"] for r in rows),
        n_examples=len(rows), logical_dtype=src.logical_dtype,
        vocab_size=header["model"]["vocab_size"] if capture.get("logits") else None,
        token_ids=bool(capture.get("token_ids")), tier=tier.name,
    ), store_id=header["store_id"], shard_id=shard_id)
    means = src.read_pooled(source_segment, "mean", decode=False)  # (N, L+1, d) float32
    logits = src.segment_array(source_segment, "logits")[:] if capture.get("logits") else None  # (N, V)
    token_ids = src.segment_array(source_segment, "token_ids")[:] if capture.get("token_ids") else None  # (T,)
    window, window_start = None, 0
    for r in rows:
        lo, hi = r["token_offset"], r["token_offset"] + r["n_tokens"]
        if window is None or hi > window_start + window.shape[1] or lo < window_start:
            window_start = lo
            window = src.read_tokens(source_segment, lo, max(hi, lo + READ_TOKENS), decode=False)  # (L+1, n', d)
        states = window[:, lo - window_start : hi - window_start]  # (L+1, n, d) stored values
        mean = means[r["row"]]  # (L+1, d)
        if tier.mantissa_bits is not None:  # the rounding and recomputed mean extraction does
            states, mean = round_example(states, tier.mantissa_bits)
        writer.append(states, mean, None if logits is None else logits[r["row"]],
                      None if token_ids is None else token_ids[lo:hi])
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
                           part_bytes(rows, stats, "text" in table.column_names),
                           json.dumps(summary, indent=1).encode(), leases)
    leases.release(segment)
    if outcome.damage is not None:
        raise StoreError(f"{layout.path}: {outcome.damage} while converting shard {shard_id}: rerun the command")
    if outcome.committed:
        crash_point("shard-committed")
    return outcome.committed


__all__ = ["check_convertible", "convert_store", "converted_header"]
