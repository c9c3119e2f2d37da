"""Read a probecache store with other tools only: the recipe of docs/STORE_FORMAT.md ("Read it without probecache").

Run as ``python -I foreign_reader.py STORE OUT.npz`` by test_foreign_readers.py, which compares what it writes with
probecache's own reader. It must never import probecache (checked at the end): everything it needs is in the
manifest parts and the segments' own zarr metadata.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np


class _WithoutProbecache:
    """This interpreter behaves like a venv holding only third-party packages: importing probecache fails (a
    library that imported it behind our back would fail here too, not just be noticed at the end)."""

    def find_spec(self, name, path=None, target=None):
        if name == "probecache" or name.startswith("probecache."):
            raise ModuleNotFoundError(f"No module named {name!r} (a foreign reader must not need it)")
        return None


sys.meta_path.insert(0, _WithoutProbecache())

PART = re.compile(r"part-(\d{5,})\.parquet")  # the only commit records; other names in manifests/ are not parts
COLUMNS = ["example_id", "split", "label", "shard_id", "segment", "token_offset", "n_tokens", "row"]


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits -> float32, exactly (bf16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def committed_parts(store: Path) -> list[str]:
    return sorted(str(p) for p in (store / "manifests").iterdir() if PART.fullmatch(p.name))


def manifest_duckdb(parts: list[str]) -> list[tuple]:
    import duckdb

    files = ", ".join("'" + p.replace("'", "''") + "'" for p in parts)
    query = f"SELECT {', '.join(COLUMNS)} FROM read_parquet([{files}]) ORDER BY shard_id, row"
    return duckdb.connect().execute(query).fetchall()


def manifest_polars(parts: list[str]):
    import polars as pl

    return pl.read_parquet(parts, columns=COLUMNS).sort(["shard_id", "row"])


def main(store: Path, out: Path) -> None:
    parts = committed_parts(store)
    rows = manifest_polars(parts)
    assert [tuple(r) for r in rows.iter_rows()] == manifest_duckdb(parts), "duckdb and polars disagree"
    found: dict[str, np.ndarray] = {}

    import dask.array as da
    import ml_dtypes
    import tensorstore as ts
    import xarray as xr

    segments = list(dict.fromkeys(rows["segment"].to_list()))  # only what the manifest references
    for segment in segments:
        folder = store / "segments" / segment
        ds = xr.open_zarr(folder, consolidated=False, zarr_format=3)
        assert ds["hidden"].dims == ("layer", "token", "channel"), ds["hidden"].dims
        assert ds["mean"].dims == ("example", "layer", "channel") and ds["logits"].dims == ("example", "vocab")
        assert ds["token_ids"].dims == ("token",)
        assert ds.attrs["logical_dtype"] == "bfloat16" and ds.attrs["store_id"] == store.name
        hidden_dask = da.from_zarr(str(folder), component="hidden")
        hidden_ts = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder / "hidden")}},
                            read=True).result()
        assert tuple(hidden_ts.domain.labels) == ("layer", "token", "channel"), hidden_ts.domain.labels
        for eid, offset, n, row in rows.filter(rows["segment"] == segment).select(
                ["example_id", "token_offset", "n_tokens", "row"]).iter_rows():
            tokens = slice(offset, offset + n)
            by_xarray = ds["hidden"].isel(token=tokens).values  # (L+1, n, d) uint16
            found[f"hidden/xarray/{eid}"] = bf16_to_float32(by_xarray)
            found[f"hidden/dask/{eid}"] = hidden_dask[:, tokens].compute().view(ml_dtypes.bfloat16).astype(np.float32)
            found[f"hidden/tensorstore/{eid}"] = bf16_to_float32(hidden_ts[:, offset : offset + n].read().result())
            found[f"token_ids/{eid}"] = ds["token_ids"].isel(token=tokens).values
            found[f"mean/{eid}"] = ds["mean"].isel(example=row).values
            found[f"last/{eid}"] = bf16_to_float32(ds["last"].isel(example=row).values)
            found[f"logits/{eid}"] = bf16_to_float32(ds["logits"].isel(example=row).values)
    manifest = {c: rows[c].to_list() for c in COLUMNS}
    assert "probecache" not in sys.modules, "the recipe must not need probecache"
    np.savez(out, manifest=np.array(json.dumps(manifest)), segments=np.array(segments), **found)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
