"""The manifest: one Parquet row per stored example, one part file per committed shard.

Every filterable field is a column, so training can select by split, label or length before touching any
array bytes. A part is THE commit record of its shard (create-if-absent, written last): readers only ever
see examples whose activations are complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("labels", pa.list_(pa.int8())),  # multi-label vector (Jigsaw's six), empty otherwise
        pa.field("n_tokens", pa.int32()),  # stored (kept) tokens
        pa.field("n_tokens_original", pa.int32()),  # before truncation
        pa.field("truncated", pa.bool_()),
        pa.field("text_sha256", pa.string()),
        pa.field("shard_id", pa.int32()),
        pa.field("segment", pa.string()),
        pa.field("token_offset", pa.int64()),
        pa.field("row", pa.int32()),
        pa.field("store_id", pa.string()),
    ],
    metadata={b"probecache.schema_version": str(SCHEMA_VERSION).encode()},
)
TEXT_FIELD = pa.field("text", pa.string())  # only when the user opted in to storing raw text


def part_bytes(rows: list[dict], stats: dict, with_text: bool = False) -> bytes:
    """Serialize one shard's rows; ``stats`` (bytes, tokens, timing) rides in the Parquet metadata."""
    schema = MANIFEST_SCHEMA.append(TEXT_FIELD) if with_text else MANIFEST_SCHEMA
    schema = schema.with_metadata({**schema.metadata, b"probecache.shard_stats": json.dumps(stats).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_parts(manifest_dir: Path, columns: list[str] | None = None, filter=None) -> pa.Table:
    """All committed parts as one table, sorted by (shard_id, row). Empty table when none is committed."""
    files = committed_part_files(manifest_dir)
    if not files:
        return MANIFEST_SCHEMA.empty_table().select(columns) if columns else MANIFEST_SCHEMA.empty_table()
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    wanted = None if columns is None else list(dict.fromkeys([*columns, "shard_id", "row"]))
    table = dataset.to_table(columns=wanted, filter=filter)
    table = table.sort_by([("shard_id", "ascending"), ("row", "ascending")])
    return table.select(columns) if columns else table


PART_NAME = re.compile(r"^part-(\d{5,})\.parquet$")


def committed_part_files(manifest_dir: Path) -> list[Path]:
    """The commit records: exactly the names the writer produces (a stray `part-1-copy.parquet` is not one)."""
    if not Path(manifest_dir).is_dir():
        return []
    return sorted(p for p in Path(manifest_dir).iterdir() if PART_NAME.match(p.name))


def part_stats(part_file: Path) -> dict:
    """The stats a part recorded at commit time (reads only the Parquet footer)."""
    meta = pq.read_schema(part_file).metadata or {}
    return json.loads(meta.get(b"probecache.shard_stats", b"{}"))
