"""Where things live inside a store, and how a store's id is derived from what it holds.

    <root>/<store_id>/
      store.json                         identity + provenance; create-if-absent
      plan.parquet                       example -> shard assignment; written once, hash in store.json
      segments/shard-00042-<attempt>/    zarr v3 group written by exactly one attempt of one shard
      manifests/part-00042.parquet       the commit record of shard 42, written last, create-if-absent
      stats/shard-00042-<attempt>.json   informational per-attempt stats (never read for correctness)
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from probecache.manifests.schema import PART_NAME, committed_part_files, part_file_name

FORMAT_VERSION = 1
STORE_JSON = "store.json"
PLAN_FILE = "plan.parquet"


def canonical_json(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-")[:40] or "x"


def store_id_for(identity: dict, dataset: str) -> str:
    """Content address: the hash of every field that changes stored bytes, behind a readable prefix.

    The dataset-name prefix only helps humans scanning a root (the name is part of the identity anyway);
    model names are not used because one checkpoint can have many names: its weights hash identifies it.
    """
    digest = sha256_hex(canonical_json({**identity, "format_version": FORMAT_VERSION}))[:20]
    return f"{_slug(dataset)}-{digest}"


def new_attempt_id() -> str:
    """Unique per attempt, sortable by start time: two attempts of one shard never share a folder."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


@dataclass(frozen=True)
class StoreLayout:
    path: Path

    @property
    def store_json(self) -> Path:
        return self.path / STORE_JSON

    @property
    def plan(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def segments(self) -> Path:
        return self.path / "segments"

    @property
    def manifests(self) -> Path:
        return self.path / "manifests"

    @property
    def stats(self) -> Path:
        return self.path / "stats"

    def segment_name(self, shard_id: int, attempt: str) -> str:
        return f"shard-{shard_id:05d}-{attempt}"

    def segment(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad segment name {name!r}")
        return self.segments / name

    def part(self, shard_id: int) -> Path:
        return self.manifests / part_file_name(shard_id)

    def committed_shards(self) -> set[int]:
        return {int(PART_NAME.match(p.name).group(1)) for p in committed_part_files(self.manifests)}
