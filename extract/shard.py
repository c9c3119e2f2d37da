"""``run_shard``: all the work of one shard, idempotent. Launchers differ only in how they call it.

skip if committed -> lease on the attempt (store/lease.py: gc keeps away) -> fresh attempt segment ->
forward batches (writes go to the background writer) -> close segment -> the commit (store/shard_commit.py:
stats, check that every file written is still there with its size, manifest part create-if-absent) -> drop the
lease. A killed attempt,
or one that loses a commit race, leaves an orphan segment that readers never see. An attempt whose segment was
deleted or damaged underneath it (a gc that ignored the lease, a person) commits nothing: the shard is
recorded in ``job.lost`` and `run_shards` extracts it again in a fresh attempt.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property

from probecache.manifests.schema import part_bytes
from probecache.store.codecs import round_example, to_storage
from probecache.store.faults import crash_point
from probecache.store.layout import StoreLayout, new_attempt_id
from probecache.store.lease import LeaseKeeper
from probecache.store.prefixes import PrefixMatcher, PrefixShare, own_part
from probecache.store.roots import LocalRoot
from probecache.store.segment import SegmentShape, SegmentWriter
from probecache.store.shard_commit import commit_shard
from probecache.store.token_policy import TokenPolicy

from .capture import CapturedBatch, capture
from .config import ExtractConfig
from .errors import Interrupted
from .plan import PlannedExample, batches
from .remote import RemoteSync
from .writer import BackgroundWriter


@dataclass
class RunTotals:
    """What this run committed (updated by the writer thread at each commit)."""

    examples: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # tokens the forward pass processed, padding included
    bytes_raw: int = 0
    bytes_stored: int = 0
    hidden_bytes_raw: int = 0
    hidden_bytes_stored: int = 0
    shards: int = 0
    in_progress_bytes: int = 0  # activations on disk for the shard being written (for the progress bar)
    in_progress_raw: int = 0  # and their uncompressed size

    def add(self, stats: dict) -> None:
        for key in ("bytes_raw", "bytes_stored", "hidden_bytes_raw", "hidden_bytes_stored", "padded_tokens"):
            setattr(self, key, getattr(self, key) + stats[key])
        self.examples += stats["n_examples"]
        self.tokens += stats["n_tokens"]
        self.shards += 1
        self.in_progress_bytes = self.in_progress_raw = 0

    def compression(self) -> float | None:
        stored = self.hidden_bytes_stored + self.in_progress_bytes
        return (self.hidden_bytes_raw + self.in_progress_raw) / stored if stored else None


@dataclass
class ExtractionJob:
    """Everything run_shard needs: the store, the loaded model and the plan."""

    config: ExtractConfig
    layout: StoreLayout
    store_id: str
    dataset_name: str
    label_names: list[str]
    plan_by_shard: dict[int, list[PlannedExample]]
    model: object
    pad_id: int
    logical_dtype: str
    n_layers: int  # L+1
    hidden_size: int
    vocab_size: int
    writer: BackgroundWriter
    totals: RunTotals = field(default_factory=RunTotals)
    forward_seconds: float = 0.0  # time inside the model's forward (the bare cost of extraction)
    remote: RemoteSync | None = None  # --root URL: uploads each commit, skips shards the remote has
    encode_pool: Executor | None = None  # --encode-threads: compresses inner chunks in parallel
    leases: LeaseKeeper | None = None  # leases/<segment>.json of the attempts in flight (gc keeps away)
    lost: list[tuple[int, str]] = field(default_factory=list)  # (shard, why): segments damaged before commit

    @cached_property
    def stored_layers(self) -> list[int]:
        """The model layers this store keeps (--layers), ascending: the hidden array's layer axis."""
        return self.config.stored_layers(self.n_layers)

    @cached_property
    def token_policy(self) -> TokenPolicy:
        return self.config.token_policy()

    def take_lost(self) -> list[tuple[int, str]]:
        """The shards whose attempt found its segment damaged and committed nothing (cleared)."""
        lost, self.lost[:] = list(self.lost), []
        return lost


@dataclass
class _ShardState:
    """One attempt of one shard, filled by the writer thread."""

    job: ExtractionJob
    shard_id: int
    segment: str
    examples: list[PlannedExample]
    started: float = field(default_factory=time.time)
    rows: list[dict] = field(default_factory=list)
    padded_tokens: int = 0
    writer: SegmentWriter | None = None
    matcher: PrefixMatcher | None = None  # --share-prefixes: this segment's sharing decisions (store/prefixes.py)
    lost: str | None = None  # why this attempt's segment cannot be committed (it was damaged underneath us)

    def add_batch(self, batch: list[PlannedExample], captured: CapturedBatch) -> None:
        if self.lost is not None:
            return  # the segment is gone: the shard is written again in a fresh attempt
        try:
            self._add_batch(batch, captured)
        except OSError:
            # a write into a folder deleted meanwhile fails; a full disk must still fail the run
            if self.writer is None or (damage := self.writer.damage()) is None:
                raise
            self.lost = damage

    def _add_batch(self, batch: list[PlannedExample], captured: CapturedBatch) -> None:
        job = self.job
        if self.writer is None:
            all_layers = job.stored_layers == list(range(job.n_layers))
            self.writer = SegmentWriter(job.layout.segment(self.segment), SegmentShape(
                n_layers=len(job.stored_layers), hidden_size=job.hidden_size,
                n_tokens=sum(job.token_policy.count(p.n_tokens) for p in self.examples),
                n_examples=len(self.examples), logical_dtype=job.logical_dtype,
                vocab_size=job.vocab_size if job.config.logits else None,
                token_ids=job.config.store_token_ids, tier=job.config.value_tier().name,
                layer_indices=None if all_layers else tuple(job.stored_layers), tokens=job.token_policy.name,
                share_prefixes=job.config.share_prefixes,
            ), pool=job.encode_pool, store_id=job.store_id, shard_id=self.shard_id)
        layers = [to_storage(h) for h in captured.hidden]  # L' views (B, T, d): the kept layers only
        if job.config.share_prefixes and self.matcher is None:
            self.matcher = PrefixMatcher(len(layers) * job.hidden_size * layers[0].dtype.itemsize)
        mean = captured.mean.numpy()  # (B, L', d)
        logits = None if captured.logits is None else to_storage(captured.logits)  # (B, V)
        self.padded_tokens += layers[0].shape[0] * layers[0].shape[1]
        flushed_before = self.writer.tokens_flushed
        policy = job.token_policy
        for b, planned in enumerate(batch):
            n = captured.lengths[b]
            states = [h[b, :n] for h in layers]  # L' x (n, d), padding stripped
            token_ids = planned.token_ids if job.config.store_token_ids else None
            example_mean = mean[b]
            # --share-prefixes (only with --tokens all) decides on the unrounded values: store/prefixes.py says why
            share = None if self.matcher is None else self.matcher.match(planned.token_ids, states)
            unrounded = states
            if (bits := job.config.value_tier().mantissa_bits) is not None:  # the mean of every rounded token
                states, example_mean = round_example(states, bits)
            if not policy.keeps_all:  # --tokens: the kept positions only (the means stay over all n tokens)
                keep = policy.positions(n).numpy()  # (n_kept,)
                states = [h[keep] for h in states]  # L' x (n_kept, d)
                token_ids = None if token_ids is None else [token_ids[i] for i in keep]
            n_kept = states[0].shape[0]
            states, token_ids = own_part(share, states, token_ids)  # all of them when nothing is shared
            row, offset = self.writer.append(states, example_mean, None if logits is None else logits[b], token_ids)
            if self.matcher is not None and share is None:
                self.matcher.add_source(planned.token_ids, unrounded, offset)
            self.rows.append(self._manifest_row(planned, row, offset, n_kept, share))
            crash_point("writer-append")
        if self.writer.tokens_flushed != flushed_before:
            job.totals.in_progress_bytes = self.writer.stored_bytes("hidden")
            job.totals.in_progress_raw = self.writer.tokens_flushed * self.writer.shape.hidden_bytes_per_token

    def _manifest_row(self, planned: PlannedExample, row: int, offset: int, n_kept: int,
                      share: PrefixShare | None = None) -> dict:
        e, job = planned.example, self.job
        record = {
            "example_id": e.example_id, "dataset": job.dataset_name, "split": e.split,
            "label": e.label, "label_name": job.label_names[e.label], "labels": list(e.labels),
            "n_tokens": n_kept, "n_tokens_original": planned.n_tokens_original,
            "truncated": planned.n_tokens < planned.n_tokens_original,
            "text_sha256": hashlib.sha256(e.text.encode()).hexdigest(),
            "shard_id": self.shard_id, "segment": self.segment, "token_offset": offset, "row": row,
            "store_id": job.store_id,
        }
        if job.config.store_text:
            record["text"] = e.text
        if job.config.share_prefixes:  # token_offset is then where its own tokens start (store/prefixes.py)
            record["prefix_offset"] = 0 if share is None else share.offset
            record["prefix_tokens"] = 0 if share is None else share.tokens
        return record

    def commit(self) -> None:
        job = self.job
        if self.lost is None:
            try:
                bytes_stored = self.writer.close()
            except OSError:
                if (damage := self.writer.damage()) is None:
                    raise
                self.lost = damage
        if self.lost is not None:
            self._give_up()
            return
        crash_point("segment-closed")
        stats = self.writer.commit_stats(self.shard_id, self.segment, self.padded_tokens, self.started, bytes_stored)
        # close() records the files it finds on disk: a file this writer wrote that is already gone (a gc, a
        # person) is caught here, by name; commit_shard then re-checks the record after refreshing the lease
        self.lost = self.writer.damage()
        if self.lost is not None:
            self._give_up()
            return
        rows = sorted(self.rows, key=lambda r: r["row"])
        summary = {k: v for k, v in stats.items() if k != "files"}
        outcome = commit_shard(LocalRoot(job.layout.path), self.shard_id, self.segment, self.writer.files,
                               part_bytes(rows, stats, job.config.store_text, job.config.share_prefixes),
                               json.dumps(summary, indent=1).encode(),
                               job.leases)
        if outcome.damage is not None:
            self.lost = outcome.damage
            self._give_up()
            return
        committed = outcome.committed
        if job.leases is not None:
            job.leases.release(self.segment)  # committed, or an orphan of a lost race: gc's age gate decides
        if committed:
            job.totals.add(stats)
            if job.remote is not None:
                job.remote.shard_committed(self.shard_id)  # upload segment then part, in the background
            crash_point("shard-committed")
        # else: another attempt committed this shard first; ours is an orphan for `gc`

    def _give_up(self) -> None:
        """Commit nothing: the segment was damaged underneath this attempt. run_shards writes the shard again."""
        job = self.job
        if job.leases is not None:
            job.leases.release(self.segment)
        job.lost.append((self.shard_id, self.lost))


def run_shard(job: ExtractionJob, shard_id: int, on_batch=None, should_stop=None, segment: str | None = None) -> bool:
    """Extract one shard unless already committed. Returns False when it was skipped.

    The commit is queued behind the shard's writes; call ``job.writer.drain()`` to wait for it. When
    ``should_stop()`` turns true after a batch, the shard is abandoned uncommitted and `Interrupted` raised.
    """
    if job.layout.part(shard_id).exists() or (job.remote is not None and job.remote.has(shard_id)):
        return False
    examples = job.plan_by_shard[shard_id]
    segment = segment or job.layout.segment_name(shard_id, new_attempt_id())
    if job.leases is not None:
        job.leases.hold(segment)  # before the segment's first byte: gc never sees it unleased while we write
    state = _ShardState(job, shard_id, segment, examples)
    for batch in batches(examples, job.config.batch_tokens, job.config.max_batch_size):
        crash_point("forward")
        started = time.perf_counter()
        captured = capture(job.model, [p.token_ids for p in batch], job.pad_id, job.config.logits, job.stored_layers)
        job.forward_seconds += time.perf_counter() - started
        job.writer.submit(state.add_batch, batch, captured)
        if on_batch is not None:
            on_batch(batch)
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped by a signal during shard {shard_id}: committed shards are kept; "
                              "rerun the same command to resume")
    job.writer.submit(state.commit)
    return True


__all__ = ["ExtractionJob", "run_shard"]
