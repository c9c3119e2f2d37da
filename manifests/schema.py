"""The manifest: one Parquet row per stored example, one part file per committed shard.

Every filterable field is a column, so training can select by split, label or length before touching any
array bytes. A part is THE commit record of its shard (create-if-absent, written last): readers only ever
see examples whose activations are complete.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"probecache.schema_version"

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
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
TEXT_FIELD = pa.field("text", pa.string())  # only when the user opted in to storing raw text
# only in stores extracted with --share-prefixes (store/prefixes.py): the example's first prefix_tokens states are
# hidden[:, prefix_offset : prefix_offset + prefix_tokens] of its segment, its own n_tokens - prefix_tokens start at
# token_offset; prefix_tokens = 0 shares nothing
PREFIX_FIELDS = (pa.field("prefix_offset", pa.int64()), pa.field("prefix_tokens", pa.int32()))
PREFIX_COLUMNS = tuple(f.name for f in PREFIX_FIELDS)
STATS_KEY = b"probecache.shard_stats"
# sha256 of the part's values and stats (content_digest): a flipped bit anywhere that pyarrow still parses
# changes a value, and that changes the digest. Parts written before it existed carry none (still readable).
DIGEST_KEY = b"probecache.part_sha256"


class ManifestError(RuntimeError):
    """A manifest part is unreadable or fails its own checksum; the message names the file and the fix."""


def content_digest(table: pa.Table, stats_json: bytes) -> str:
    """sha256 over every column's values (by name, in order) and the stats JSON: independent of Parquet's
    encoding, so it checks what a reader gets, not how a pyarrow version happened to lay the bytes out."""
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(json.dumps(name).encode())
        h.update(json.dumps(table[name].to_pylist(), separators=(",", ":"), ensure_ascii=True).encode())
    h.update(stats_json)
    return h.hexdigest()


def part_bytes(rows: list[dict], stats: dict, with_text: bool = False, with_prefixes: bool = False) -> bytes:
    """Serialize one shard's rows; ``stats`` (bytes, tokens, timing, the segment's file checksums) rides in the
    Parquet metadata, and the content digest over both beside it. The optional columns exist only when asked for."""
    schema = MANIFEST_SCHEMA
    for field in (*(PREFIX_FIELDS if with_prefixes else ()), *((TEXT_FIELD,) if with_text else ())):
        schema = schema.append(field)
    stats_json = json.dumps(stats).encode()
    table = pa.Table.from_pylist(rows, schema=schema)
    digest = content_digest(table, stats_json).encode()
    table = table.replace_schema_metadata({**schema.metadata, STATS_KEY: stats_json, DIGEST_KEY: digest})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_part(source: Path | bytes, where: str | None = None) -> tuple[pa.Table, dict]:
    """One part, whole and checked against its own digest: (rows, commit stats). ManifestError naming
    ``where`` (default: the path) when it cannot be parsed or its values are not what was committed."""
    where = where or f"manifests/{Path(source).name}"
    fix = "run `probecache store verify`; rerunning the extract command rewrites damaged shards"
    try:
        table = pq.read_table(pa.BufferReader(source) if isinstance(source, bytes) else source)
        meta = table.schema.metadata or {}
        stats_json = meta.get(STATS_KEY, b"{}")
        stats = json.loads(stats_json)
        table = table.replace_schema_metadata(None)
        # a flipped bit in a key's name would hide the digest or the stats: only our own keys may be present
        unknown = set(meta) - {STATS_KEY, DIGEST_KEY, SCHEMA_VERSION_KEY, b"ARROW:schema"}
        recorded = meta.get(DIGEST_KEY)  # None: a part written before digests existed
        digest_ok = recorded is None or recorded.decode(errors="replace") == content_digest(table, stats_json)
        matches = not unknown and STATS_KEY in meta and digest_ok
    except Exception as e:  # pyarrow and json raise several types for a damaged file
        raise ManifestError(f"{where} is damaged ({type(e).__name__}): {fix}") from e
    if not matches:
        raise ManifestError(f"{where} is damaged (its values do not match the checksum written at commit): {fix}")
    if not isinstance(stats, dict):
        raise ManifestError(f"{where} is damaged (its commit stats are not a JSON object): {fix}")
    return table, stats


def has_digest(part_file: Path) -> bool:
    return DIGEST_KEY in (pq.read_schema(part_file).metadata or {})


def read_parts(manifest_dir: Path, columns: list[str] | None = None, filter=None) -> pa.Table:
    """All committed parts as one table, each checked against its digest, sorted by (shard_id, row). Empty
    table when none is committed."""
    tables = [read_part(f)[0] for f in committed_part_files(manifest_dir)]
    return select_rows(concat_parts(tables), columns, filter)


def concat_parts(tables: list[pa.Table]) -> pa.Table:
    """Parts as one table in storage order (shard, row); an empty manifest when there are none."""
    if not tables:
        return MANIFEST_SCHEMA.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    return table.sort_by([("shard_id", "ascending"), ("row", "ascending")])


def select_rows(table: pa.Table, columns: list[str] | None = None, filter=None) -> pa.Table:
    """A filter (pyarrow.compute expression) then a column selection of an in-memory manifest."""
    if filter is not None:
        table = table.filter(filter)
    return table.select(columns) if columns else table


PART_NAME = re.compile(r"^part-(\d{5,})\.parquet$")


def part_file_name(shard_id: int) -> str:
    """The commit record's name of a shard: what PART_NAME matches."""
    return f"part-{shard_id:05d}.parquet"


def committed_part_files(manifest_dir: Path) -> list[Path]:
    """The commit records: exactly the names the writer produces (a stray `part-1-copy.parquet` is not one)."""
    if not Path(manifest_dir).is_dir():
        return []
    return sorted(p for p in Path(manifest_dir).iterdir() if PART_NAME.match(p.name))


def part_stats(part_file: Path) -> dict:
    """The stats a part recorded at commit time (reads only the Parquet footer; not checked against the digest:
    for summaries, never for deciding what to read or delete)."""
    meta = pq.read_schema(part_file).metadata or {}
    return json.loads(meta.get(STATS_KEY, b"{}"))
