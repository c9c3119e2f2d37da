"""Remote-store benchmark: reading a store from the loopback S3 server relative to the same store on local disk.

One run, side by side (absolute numbers on shared 2-core machines are noisy; ratios of interleaved runs less so):

  upload        `store push` of the first N shards to a moto S3 server on 127.0.0.1 (MB/s of stored bytes)
  segment read  the training access pattern: every segment's ``hidden`` read whole (all layers, every token),
                as the token stream does. Local disk; remote through the mirror with an empty cache (cold:
                download + check + decode); remote again with the mirror filled (warm). MB/s of decoded values
                and the ratio to local.
  example read  the reader API: ``store.hidden(example_id)`` for a random sample of examples, local, remote
                cold, remote warm, and zarr's own ObjectStore on the same objects (what a plain zarr reader
                of the store would do). Requests per example read are counted from the server's own request
                log, so zarr's requests and ours are counted the same way.

    python bench/remote.py                              # the store of the last `make extract`, 2 shards
    python bench/remote.py --store STORE --shards 1 --examples 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """moto's standalone S3 server; its request log (one line per request) is the request counter."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.log = folder / "moto.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        self.endpoint = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto server did not start: {self.log.read_text()[-2000:]}")

    def requests(self, method: str = "GET") -> int:
        time.sleep(0.2)  # the server logs after it has answered
        # werkzeug colours some status lines (206 for range requests) with ANSI escapes around the method
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text())
        return sum(f'"{method} /{BUCKET}/' in line for line in text.splitlines())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def segment_pass(store, segments: list[str]) -> tuple[float, int]:
    """Every listed segment's hidden read whole: (seconds, decoded bytes)."""
    started, total = time.perf_counter(), 0
    for segment in segments:
        total += int(store.read_tokens(segment, decode=False).nbytes)
    return time.perf_counter() - started, total


def example_pass(read, ids: list[str]) -> tuple[float, int]:
    started, total = time.perf_counter(), 0
    for eid in ids:
        total += int(read(eid).nbytes)
    return time.perf_counter() - started, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = (REPO / ".last-store").read_text().strip() if (REPO / ".last-store").is_file() else None
    parser.add_argument("--store", default=default, help="A local store (default: the last `make extract`).")
    parser.add_argument("--shards", type=int, default=2, help="How many shards to upload and read.")
    parser.add_argument("--examples", type=int, default=200, help="Examples in the per-example read sample.")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "remote.json"))
    args = parser.parse_args()
    if not args.store:
        sys.exit("no store: pass --store (or run `make extract` first)")

    work = Path(tempfile.mkdtemp(prefix="probecache-bench-remote-"))
    server = Server(work)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_ENDPOINT_URL": server.endpoint, "AWS_REGION": "us-east-1",
                       "PROBECACHE_CACHE": str(work / "cache"), "PROBECACHE_REMOTE_CACHE_SIZE": "100G"})
    try:
        run(args, server, work)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args, server: Server, work: Path) -> None:
    import boto3
    import obstore.store
    import torch
    import zarr
    from probecache.store.codecs import from_storage
    from probecache.store.reader import open_store
    from probecache.store.roots import REQUESTS, LocalRoot, open_root
    from probecache.store.transfer import TransferReport, committed_parts, copy_header, copy_shard

    torch.set_num_threads(1)
    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    local = open_store(args.store)
    shards = sorted(committed_parts(LocalRoot(local.path)))[: args.shards]
    url = f"s3://{BUCKET}/team/{local.store_id}"
    src, dst = LocalRoot(local.path), open_root(url)

    # ---- upload --------------------------------------------------------------------------------------------
    report = TransferReport(src.url, dst.url, local.store_id)
    started = time.perf_counter()
    copy_header(src, dst)
    for shard in shards:
        copy_shard(src, dst, shard, report)
    upload_s = time.perf_counter() - started
    results = {"store": local.store_id, "shards": len(shards), "stored_mb": report.bytes_copied / 1e6,
               "upload_mb_per_s": report.bytes_copied / 1e6 / upload_s}

    manifest = local.manifest(columns=["example_id", "segment", "shard_id"]).to_pylist()
    rows = [r for r in manifest if r["shard_id"] in shards]
    segments = list(dict.fromkeys(r["segment"] for r in rows))
    ids = random.Random(0).sample([r["example_id"] for r in rows], min(args.examples, len(rows)))

    def fresh_remote():
        shutil.rmtree(work / "cache" / "remote", ignore_errors=True)
        return open_store(url)

    # ---- whole segments (training) -------------------------------------------------------------------------
    local_s, nbytes = segment_pass(local, segments)
    remote = fresh_remote()
    gets = server.requests()
    cold_s, _ = segment_pass(remote, segments)
    cold_gets = server.requests() - gets
    warm_s, _ = segment_pass(open_store(url), segments)
    results["segment_read"] = {
        "decoded_mb": nbytes / 1e6, "local_mb_per_s": nbytes / 1e6 / local_s,
        "remote_cold_mb_per_s": nbytes / 1e6 / cold_s, "remote_warm_mb_per_s": nbytes / 1e6 / warm_s,
        "cold_vs_local": local_s / cold_s, "warm_vs_local": local_s / warm_s,
        "cold_requests_per_segment": cold_gets / len(segments),
    }

    # ---- single examples (reader API) ----------------------------------------------------------------------
    local_e, ebytes = example_pass(local.hidden, ids)
    remote = fresh_remote()
    before_ours, before_log = REQUESTS["get"], server.requests()
    cold_e, _ = example_pass(remote.hidden, ids)
    ours_cold = server.requests() - before_log
    assert ours_cold >= REQUESTS["get"] - before_ours  # the log sees what our counter sees
    before_log = server.requests()
    warm_e, _ = example_pass(open_store(url).hidden, ids)
    ours_warm = server.requests() - before_log

    # zarr's own remote store on the same objects: what reading the store without the mirror costs
    groups: dict[str, object] = {}
    index = {r["example_id"]: r for r in local.manifest(columns=["example_id", "segment", "token_offset",
                                                                  "n_tokens"]).to_pylist()}

    def zarr_direct(eid: str):
        r = index[eid]
        if r["segment"] not in groups:
            prefix = f"team/{local.store_id}/segments/{r['segment']}"
            store = zarr.storage.ObjectStore(obstore.store.S3Store(BUCKET, prefix=prefix,
                                                                   client_options={"allow_http": True}),
                                             read_only=True)
            groups[r["segment"]] = zarr.open_group(store=store, mode="r", zarr_format=3)
        array = groups[r["segment"]]["hidden"]
        return from_storage(array[:, r["token_offset"]: r["token_offset"] + r["n_tokens"]], local.logical_dtype)

    before_log = server.requests()
    direct_e, _ = example_pass(zarr_direct, ids)
    direct_gets = server.requests() - before_log
    n = len(ids)
    results["example_read"] = {
        "examples": n, "decoded_mb": ebytes / 1e6,
        "local_ms": 1e3 * local_e / n, "remote_cold_ms": 1e3 * cold_e / n, "remote_warm_ms": 1e3 * warm_e / n,
        "zarr_objectstore_ms": 1e3 * direct_e / n,
        "requests_per_example": {"mirror_cold": ours_cold / n, "mirror_warm": ours_warm / n,
                                 "zarr_objectstore": direct_gets / n},
        "cold_vs_local": local_e / cold_e, "warm_vs_local": local_e / warm_e, "zarr_vs_local": local_e / direct_e,
    }

    s, e = results["segment_read"], results["example_read"]
    rq = e["requests_per_example"]
    print(f"store {local.store_id}: {len(shards)} shards, {results['stored_mb']:,.1f} MB stored, uploaded at "
          f"{results['upload_mb_per_s']:,.0f} MB/s to the loopback S3 server")
    print(f"segment reads (training pattern, {s['decoded_mb']:,.0f} MB decoded):")
    print(f"  local disk      {s['local_mb_per_s']:8,.0f} MB/s   1.00x")
    print(f"  remote, cold    {s['remote_cold_mb_per_s']:8,.0f} MB/s   {s['cold_vs_local']:.2f}x   "
          f"({s['cold_requests_per_segment']:.1f} GETs per segment)")
    print(f"  remote, warm    {s['remote_warm_mb_per_s']:8,.0f} MB/s   {s['warm_vs_local']:.2f}x")
    print(f"example reads (store.hidden, {n} random examples):")
    print(f"  local disk      {e['local_ms']:8.2f} ms/example   1.00x")
    print(f"  remote, cold    {e['remote_cold_ms']:8.2f} ms/example   {e['cold_vs_local']:.2f}x   "
          f"{rq['mirror_cold']:.2f} requests/example")
    print(f"  remote, warm    {e['remote_warm_ms']:8.2f} ms/example   {e['warm_vs_local']:.2f}x   "
          f"{rq['mirror_warm']:.2f} requests/example")
    print(f"  zarr ObjectStore{e['zarr_objectstore_ms']:8.2f} ms/example   {e['zarr_vs_local']:.2f}x   "
          f"{rq['zarr_objectstore']:.2f} requests/example (no mirror: ranges per inner chunk)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
