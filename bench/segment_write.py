"""The segment writer's store step: zarr's private ``sync(store.set(...))`` vs a plain file write.

One zarr shard of SmolLM2-shaped bf16 activations (31 layers x 1024 tokens x 576) is encoded once, then
written ``--repeats`` times by each method, interleaved (absolute times drift on shared machines; ratios of
interleaved runs do not), each into a fresh array folder. Also times the whole ``_flush``: encode + write.

    python bench/segment_write.py --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from probecache.store.codecs import activation_blosc, activation_codec
from probecache.store.shard_encoding import encode_shard


def _array(folder: Path) -> None:
    group = zarr.open_group(str(folder), mode="w-")
    group.create_array("hidden", shape=(31, 4096, 576), dtype="uint16", chunks=(1, 256, 576),
                       shards=(31, 1024, 576), compressors=activation_codec(), fill_value=0)


def write_private(folder: Path, data: bytes) -> None:
    from zarr.core.buffer import default_buffer_prototype  # the old writer's private imports
    from zarr.core.sync import sync

    store = zarr.storage.LocalStore(str(folder))
    sync(store.set("hidden/c/0/0/0", default_buffer_prototype().buffer.from_bytes(data)))


def write_plain(folder: Path, data: bytes) -> None:
    path = folder / "hidden" / "c" / "0" / "0" / "0"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # (L+1, 1024, d) bf16 bits of N(0, 1) values scaled per layer: a realistic exponent spread
    scale = np.logspace(0, 3, 31, dtype=np.float32)[:, None, None]
    values = rng.standard_normal((31, 1024, 576), dtype=np.float32) * scale
    block = (values.view(np.uint32) >> 16).astype(np.uint16)
    codec = activation_blosc(2)
    data = encode_shard(block, 256, 1024, codec)
    times: dict[str, list[float]] = {"private store.set": [], "plain write": [], "encode+private": [],
                                     "encode+plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, write, encode in (("private store.set", write_private, False),
                                        ("plain write", write_plain, False),
                                        ("encode+private", write_private, True), ("encode+plain", write_plain, True)):
                folder = Path(tmp) / f"{r}-{name.replace(' ', '_')}"
                _array(folder)
                start = time.perf_counter()
                write(folder, encode_shard(block, 256, 1024, codec) if encode else data)
                times[name].append(time.perf_counter() - start)
                got = zarr.open_group(str(folder), mode="r")["hidden"][:, :1024]
                assert np.array_equal(got, block), name
                shutil.rmtree(folder)
    print(f"one shard: {block.nbytes / 1e6:.1f} MB raw, {len(data) / 1e6:.1f} MB encoded; {args.repeats} repeats")
    for name, ts in times.items():
        print(f"{name:18s} median {statistics.median(ts) * 1e3:8.1f} ms   all {[round(t * 1e3, 1) for t in ts]}")
    for a, b in (("plain write", "private store.set"), ("encode+plain", "encode+private")):
        print(f"{a} / {b}: {statistics.median(times[a]) / statistics.median(times[b]):.3f}")


if __name__ == "__main__":
    main()
