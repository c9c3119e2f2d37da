"""A store read by other tools without probecache (docs/STORE_FORMAT.md, "Read it without probecache").

tests/store/foreign_reader.py runs in a fresh interpreter (``python -I``: no test paths, no probecache import) and
reads the manifest with duckdb and polars, the segments with xarray, dask and tensorstore; every value it finds
must equal what probecache's reader returns. The store carries what such a reader must skip: a shard whose
segment is written but not committed, an orphan attempt, and a set-aside commit record in manifests/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("foreign_reader.py")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, reviews_csv_writer, extract_tiny_store):
    tmp = tmp_path_factory.mktemp("foreign")
    store = extract_tiny_store(tiny_model, tmp / "stores", reviews_csv_writer(tmp / "reviews.csv"), logits=True,
                               store_token_ids=True, max_tokens=40)
    manifests, segments = store.layout.manifests, store.layout.segments
    # debris every real store can hold: an orphan attempt (a killed or losing writer), a commit record extract set
    # aside, and shard 3 written but not committed yet (its segment exists, its part does not)
    first = store.segments()[0]
    shutil.copytree(segments / first, segments / first.replace(first.split("-", 2)[2], "20260101T000000-deadbeef"))
    shutil.copy(manifests / "part-00000.parquet", manifests / ".probecache-broken-part-00000-20260101T000000-0.parquet")
    (manifests / "part-00003.parquet").unlink()
    from probecache.store.reader import open_store

    return open_store(store.path)  # a fresh reader: three committed shards


def test_other_tools_read_what_probecache_reads(store, tmp_path):
    out = tmp_path / "found.npz"
    result = subprocess.run([sys.executable, "-I", str(SCRIPT), str(store.path), str(out)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    found = np.load(out)
    manifest = json.loads(str(found["manifest"]))
    expected = store.manifest(columns=list(manifest))
    assert expected.num_rows == 24  # 30 reviews in shards of 8, shard 3 (6 reviews) uncommitted
    for column, values in manifest.items():  # storage order is (shard, row) order
        assert values == expected[column].to_pylist(), column
    assert list(found["segments"]) == store.segments()  # neither the orphan nor the uncommitted segment
    ids = manifest["example_id"]
    for eid in ids:
        want = store.hidden(eid).float().numpy()  # (L+1, n, d): bf16 widened exactly
        for tool in ("xarray", "dask", "tensorstore"):
            assert np.array_equal(found[f"hidden/{tool}/{eid}"], want), (tool, eid)
        assert np.array_equal(found[f"token_ids/{eid}"], store.token_ids(eid).numpy())
    for name, read in (("mean", store.mean), ("last", store.last), ("logits", store.logits)):
        want = read(ids).float().numpy()
        assert np.array_equal(np.stack([found[f"{name}/{eid}"] for eid in ids]), want), name
