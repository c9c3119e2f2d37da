"""`extract --root s3://bucket/prefix`: extract into a local staging copy, upload each shard as it commits.

The local pipeline is unchanged: shards are written and committed into the staging folder
($PROBECACHE_CACHE/staging/<hash of the root URL>/<store_id>, same store id, same plan). What this adds:

    before the run     the remote header (plan.parquet, store.json) is copied into staging, so an existing
                       remote store is checked against this run's identity and plan; "already extracted" when
                       every remote part exists; then our header goes up create-if-absent (same checks)
    before a shard     skipped when the remote already has its part (LIST manifests/): a second user
                       contributes only the missing shards, concurrently with the first
    after a commit     on a background thread: the segment's files, its stats, then the part
                       create-if-absent (store/transfer.py copy_shard). The conditional PUT decides between
                       concurrent extractors; the loser's uploaded segment is an orphan for `store gc`.
                       The uploaded shard is then removed from staging (staging holds only shards in flight)
    on a rerun         remote parts whose segment is missing or incomplete (one LIST of segments/) are moved
                       aside to manifests/.probecache-broken-part-* and their shards extracted again
                       (store/repair.py); shards committed in staging but never uploaded (the server was
                       down, the job was killed) are uploaded first, then extraction resumes with what the
                       remote lacks
    while uploading    each segment is leased at the remote (leases/<segment>.json, store/lease.py) so a
                       `store gc` of the remote store keeps away, and checked by one more LIST before its
                       part goes up

An upload error stops the run at the next shard boundary with a one-line message; the rerun resumes.
"""

from __future__ import annotations

import shutil
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from probecache.manifests.schema import PART_NAME
from probecache.store.errors import StoreError
from probecache.store.layout import StoreLayout
from probecache.store.lease import LeaseKeeper
from probecache.store.remote import parse_url
from probecache.store.roots import LocalRoot, ObjectRoot
from probecache.store.status import parse_segment
from probecache.store.transfer import (
    DamagedSource,
    TransferReport,
    committed_parts,
    copy_header,
    copy_shard,
    read_stats,
)


class RemoteSync:
    """The store at ``<root URL>/<store_id>`` mirrored from the staging ``layout`` one commit at a time."""

    def __init__(self, root_url: str, store_id: str, layout: StoreLayout, progress: bool = False):
        self.remote = ObjectRoot(parse_url(root_url).child(store_id))
        self.url = self.remote.url
        self.layout = layout
        self.local = LocalRoot(layout.path)
        self.progress = progress
        self.report = TransferReport(str(layout.path), self.url, store_id)
        self._known: set[int] = set()  # shards whose remote part we have seen
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="probecache-upload")
        self._futures: list[Future] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.leases = LeaseKeeper(self.remote)  # the remote store's leases of the segments being uploaded

    # ---- before the run ------------------------------------------------------------------------------

    def pull_header(self) -> None:
        """Copy an existing remote plan.parquet and store.json into staging (the local checks then compare
        this run's identity and plan with the remote store's, before anything is written)."""
        for name in ("plan.parquet", "store.json"):
            if not (self.layout.path / name).is_file():
                data = self.remote.get(name)
                if data is not None:
                    self.local.put_if_absent(name, data)

    def committed(self) -> set[int]:
        """Shard ids whose part exists remotely (one LIST)."""
        found = set(committed_parts(self.remote))
        with self._lock:
            self._known |= found
            return set(self._known)

    def publish_header(self) -> None:
        copy_header(self.local, self.remote)

    def upload_leftovers(self) -> None:
        """Shards committed in staging by an earlier run but never uploaded: upload them now."""
        remote = self.committed()
        for shard_id in sorted(self.layout.committed_shards()):
            if shard_id in remote:
                self._drop_local(shard_id)
                continue
            try:
                self._upload(shard_id)
            except DamagedSource as e:  # e.g. a crash lost unsynced segment bytes: extract the shard again
                if self.progress:
                    print(f"warning: shard {shard_id} in staging is damaged ({e}); extracting it again",
                          file=sys.stderr)
                self._drop_local(shard_id)

    # ---- during the run (hooks called by extract/shard.py) ----------------------------------------------

    def has(self, shard_id: int) -> bool:
        """True when the remote already has this shard (skip it). Raises an earlier upload's error first, so a
        dead server stops the run at the next shard instead of extracting shards that cannot be uploaded."""
        self.raise_error()
        with self._lock:
            if shard_id in self._known:
                return True
        try:
            return shard_id in self.committed()
        except StoreError as e:
            raise StoreError(f"{e} (committed shards are kept; rerun the same command to resume)") from None

    def shard_committed(self, shard_id: int) -> None:
        """Called on the writer thread right after the local commit: upload in the background."""
        self._futures.append(self._pool.submit(self._guarded_upload, shard_id))

    def wait(self) -> None:
        """Block until every queued upload is done; raise the first error."""
        for future in list(self._futures):
            future.result()
        self.raise_error()

    def raise_error(self) -> None:
        if self._error is not None:
            error = self._error
            raise StoreError(f"uploading to {self.url} failed: {error} (the shard stays committed in the local "
                             "staging copy; rerun the same command to upload it and continue)")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.leases.close()

    def summary(self) -> str:
        r = self.report
        lost = f", {len(r.shards_lost)} committed by another extractor first" if r.shards_lost else ""
        return (f"uploaded {len(r.shards_copied)} shards to {self.url} ({r.bytes_copied / 1e6:,.1f} MB, "
                f"{r.files_copied} files){lost}")

    # ---- uploads --------------------------------------------------------------------------------------------

    def _guarded_upload(self, shard_id: int) -> None:
        if self._error is not None:
            return  # the server is gone: leave the rest in staging for the rerun
        try:
            self._upload(shard_id)
        except BaseException as e:  # reported at the next shard boundary and at the end of the run
            self._error = e

    def _upload(self, shard_id: int) -> None:
        won = copy_shard(self.local, self.remote, shard_id, self.report, verify_existing=False, leases=self.leases)
        with self._lock:
            self._known.add(shard_id)
        if self.progress and not won:
            print(f"shard {shard_id}: committed at {self.url} by another extractor first; ours is an orphan "
                  "for `probecache store gc`", file=sys.stderr)
        self._drop_local(shard_id)

    def _drop_local(self, shard_id: int) -> None:
        """Remove an uploaded shard from staging: the part first, so staging never holds a part whose segment
        is gone (a rerun then sees the shard as remote-only and skips it)."""
        part = self.layout.part(shard_id)
        try:
            segment = read_stats(part.read_bytes()).get("segment")
        except (OSError, ValueError):
            return
        part.unlink(missing_ok=True)
        if isinstance(segment, str) and PART_NAME.match(part.name) and parse_segment(segment) is not None:
            shutil.rmtree(self.layout.segment(segment), ignore_errors=True)
            (self.layout.stats / f"{segment}.json").unlink(missing_ok=True)
