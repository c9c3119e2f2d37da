"""Reading a store: the manifest, one example's hidden states, pooled arrays, logits.

Readers only see committed shards (those with a manifest part); in-progress or orphaned segments are
invisible. Array reads slice contiguous layer ranges: zarr integer-list selection is ~40x slower.

Nothing is trusted unchecked: store.json must match its seal (header.py), every part its digest
(manifests/schema.py), every segment file its commit record (verified.py), and the header's dtype, layers,
width and label names must agree with the arrays and the manifest. A damaged store is a StoreError naming
the file and the fix, never a value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zarr
from probecache.manifests.schema import (
    PART_NAME,
    ManifestError,
    committed_part_files,
    concat_parts,
    part_stats,
    read_part,
    select_rows,
)

from .codecs import from_storage, storage_dtype
from .decoded_cache import DecodedCache
from .errors import StoreError
from .header import label_name_mismatch, read_header, stored_layers
from .layers import Layers, LayerSelectionError, format_layers, layer_runs, select_layers
from .layout import StoreLayout
from .mirror import Mirror
from .prefixes import example_ranges
from .remote import Location, check_store_name, clean_key, parse_root
from .roots import open_root
from .tiers import SCALE_ARRAY, Tier, dequantize, scale_rows, store_tier
from .token_policy import TokenPolicy, store_token_policy
from .verified import CheckedFiles, FileRecord, VerifiedSegmentStore


class _Where(NamedTuple):
    """One example's manifest coordinates (prefix_*: --share-prefixes stores, store/prefixes.py; 0 elsewhere)."""

    segment: str
    token_offset: int
    n_tokens: int
    row: int
    prefix_offset: int = 0
    prefix_tokens: int = 0


def open_store(path_or_url: str | Path, cache_size: str | int | None = None,
               decoded_cache: DecodedCache | None = None) -> Store:
    """Open a store for reading: a folder ``<root>/<store_id>`` (or file:// URL), or an object-store URL
    ``s3://bucket/prefix/<store_id>`` (also gs://, memory://) read through a size-capped local mirror
    (``cache_size``, default $PROBECACHE_REMOTE_CACHE_SIZE or 20G; see mirror.py). ``decoded_cache``: token
    streams of this store read through it (decoded_cache.py)."""
    parsed = parse_root(path_or_url)
    if isinstance(parsed, Location):
        mirror = Mirror(parsed.url, cache_size)
        store = Store(mirror.path, mirror)
    else:
        store = Store(parsed)
    store.decoded_cache = decoded_cache
    return store


class Store:
    """A store read from a local folder, or (``mirror``) from object storage through its local mirror: the same
    checks either way, only where segment bytes come from differs (``_segment_store``)."""

    def __init__(self, path: Path, mirror: Mirror | None = None):
        self.mirror = mirror
        self.url: str | None = mirror.url if mirror is not None else None  # what a remote store is called
        self.layout = StoreLayout(Path(path))
        self.info: dict = read_header(self.layout.path)
        self._groups: dict[str, zarr.Group] = {}
        self._checked = CheckedFiles()
        # token streams read their blocks through it when set (--decoded-cache): uncompressed local copies
        self.decoded_cache: DecodedCache | None = None

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def store_id(self) -> str:
        return self.info["store_id"]

    @property
    def n_layers(self) -> int:
        """L+1: the embedding output plus one tensor per transformer block."""
        return self.info["model"]["n_layers"]

    @property
    def hidden_size(self) -> int:
        return self.info["model"]["hidden_size"]

    @property
    def logical_dtype(self) -> str:
        return self.info["logical_dtype"]

    @cached_property
    def stored_layers(self) -> list[int]:
        """The model layers this store holds, ascending (all L+1 unless extracted with --layers): position i of
        every per-layer array is model layer ``stored_layers[i]`` (checked with the header, header.py)."""
        return stored_layers(self.info)

    @cached_property
    def token_policy(self) -> TokenPolicy:
        """Which tokens of each prompt the store holds (store/token_policy.py; all unless extracted with --tokens;
        checked with the header, header.py)."""
        return store_token_policy(self.info)

    @property
    def shares_prefixes(self) -> bool:
        """Whether examples may reference a shared prefix (--share-prefixes; manifest prefix_offset/prefix_tokens)."""
        return bool(self.info["capture"].get("shared_prefixes"))

    @cached_property
    def tier(self) -> Tier:
        """How ``hidden`` is stored (store/tiers.py): lossless, mantissa-K, fp8-e4m3, fp8-e5m2 or intK."""
        return store_tier(self.info)

    @property
    def label_names(self) -> list[str]:
        return self.info["dataset"]["label_names"]

    def __repr__(self) -> str:
        return f"Store({self.url or str(self.path)!r})"

    # ---- manifest ---------------------------------------------------------------------------------

    def manifest(self, split: str | Iterable[str] | None = None, label: int | Iterable[int] | None = None,
                 columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """Committed examples as a pyarrow Table, in storage order; filters apply before any array read."""
        expr = filter
        for name, value in (("split", split), ("label", label)):
            if value is None:
                continue
            values = [value] if isinstance(value, (str, int)) else list(value)
            term = pc.field(name).isin(values)
            expr = term if expr is None else expr & term
        return select_rows(self._committed[0], columns, expr)

    @cached_property
    def _committed(self) -> tuple[pa.Table, dict[str, FileRecord]]:
        """Every committed part, each checked against its digest, read once: (manifest in storage order,
        segment -> its commit record of files)."""
        if not self.layout.manifests.is_dir() and self.layout.segments.is_dir() and any(self.layout.segments.iterdir()):
            raise StoreError(f"{self.path}: manifests/ is missing but segments exist: the store's commit records "
                             "are lost; restore manifests/ from a copy, or re-extract into a new root")
        tables, records = [], {}
        for part in committed_part_files(self.layout.manifests):
            try:
                table, stats = read_part(part, f"{self.path}/manifests/{part.name}")
            except ManifestError as e:
                raise StoreError(str(e)) from None
            shard = int(PART_NAME.match(part.name).group(1))
            segment = stats.get("segment")
            if (stats.get("shard_id") != shard or set(table["shard_id"].to_pylist()) - {shard}
                    or set(table["segment"].to_pylist()) - {segment}):
                raise StoreError(f"{self.path}/manifests/{part.name} does not describe shard {shard} (it records shard "
                                 f"{stats.get('shard_id')}, segment {segment}): a part was copied over another; run "
                                 "`probecache store verify`")
            tables.append(table)
            files = stats.get("files")
            if isinstance(files, dict) and isinstance(segment, str):
                # the names become paths in a mirror: a damaged or hostile record must not point outside it
                records[segment] = {clean_key(k, f"{self.path}/manifests/{part.name}: file"): (int(v[0]), str(v[1]))
                                    for k, v in files.items()}
        manifest = concat_parts(tables)
        self._check_label_names(manifest)
        return manifest, records

    def _check_label_names(self, manifest: pa.Table) -> None:
        """Each row's label_name must be store.json's name for its label: swapped or edited names would
        silently invert every metric and every served label."""
        if "label_name" not in manifest.column_names or manifest.num_rows == 0:
            return
        wrong = label_name_mismatch(self.label_names, manifest["label"].to_pylist(),
                                    manifest["label_name"].to_pylist())
        if wrong:
            raise StoreError(f"{self.path}: store.json's label_names {self.label_names} disagree with the manifest "
                             f"(label {wrong[0]} is {wrong[1]!r} there): store.json was edited or damaged; restore "
                             "it from a copy")

    def segment_files(self, segment: str) -> FileRecord | None:
        """{file: (size, crc32c)} of a committed segment from its commit record (None for parts written before
        records existed, which `store verify` reports; a mirror fetches only recorded files, so none there)."""
        files = self._committed[1].get(segment)
        if files is None and self.mirror is not None:
            raise StoreError(f"segment {segment!r} of {self.url} has no commit record of its files: run "
                             "`probecache store verify` on it")
        return files

    @cached_property
    def _index(self) -> dict[str, _Where]:
        """example_id -> its coordinates (_Where), built once from the manifest."""
        present = self._committed[0].column_names
        names = [c for c in _Where._fields if c in present]  # prefix_* only where prefixes are shared
        t = self.manifest(columns=["example_id", *names])  # not the text column: it can dwarf the rest
        cols = [t[c].to_pylist() for c in names]
        return {eid: _Where(*where) for eid, *where in zip(t["example_id"].to_pylist(), *cols, strict=True)}

    def _locate(self, example_id: str) -> _Where:
        try:
            return self._index[example_id]
        except KeyError:
            raise StoreError(f"example {example_id!r} is not in store {self.store_id} (or not committed)") from None

    def _segment_store(self, segment: str, files: FileRecord) -> VerifiedSegmentStore:
        if self.mirror is not None:  # fetched whole on first read, checked, kept in the mirror
            return self.mirror.segment_store(segment, files, self._checked)
        where = f"{self.path}/segments/{segment}"
        return VerifiedSegmentStore(self.layout.segment(segment), files, self._checked, where)

    def _group(self, segment: str) -> zarr.Group:
        """The zarr group of a committed segment, read through its commit record and checked against the header."""
        if segment not in self._groups:
            files = self.segment_files(segment)
            location = self._segment_store(segment, files) if files else str(self.layout.segment(segment))
            group = zarr.open_group(store=location, mode="r")
            self._check_arrays(segment, group)
            self._groups[segment] = group
        return self._groups[segment]

    def _check_arrays(self, segment: str, group: zarr.Group) -> None:
        """store.json's dtype, layer count and width must describe the segment's hidden array: a reader that
        trusted an edited header would reinterpret bf16 bits or drop layers without a word."""
        hidden = group["hidden"]
        want = (self.tier.storage or storage_dtype(self.logical_dtype), self.logical_dtype, len(self.stored_layers),
                self.hidden_size)
        got = (hidden.dtype, hidden.attrs.get("logical_dtype"), hidden.shape[0], hidden.shape[2])
        if np.dtype(want[0]) != np.dtype(got[0]) or want[1:] != got[1:]:
            raise StoreError(f"{self.path}: store.json says {want[1]} values, {want[2]} layers of width {want[3]}, "
                             f"but segment {segment} holds {got[1]} ({got[0]}) values, {got[2]} layers of width "
                             f"{got[3]}: store.json was edited or damaged; restore it from a copy")

    # ---- arrays: the public read API (training, benchmarks and users read through these) -------------------

    def select_layers(self, layers: Layers = None) -> list[int]:
        """A layer selection in the one grammar of store/layers.py (None, int, slice, list, "0-4,20,-1") as model
        layer indices (0 = embedding output, L = final-norm output; -1 = L). None or "all": every layer the store
        holds. A layer the store does not hold (extracted with --layers) is a LayerSelectionError naming those it
        has."""
        if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
            return list(self.stored_layers)
        chosen = select_layers(layers, self.n_layers)
        missing = [layer for layer in chosen if layer not in self._layer_position]
        if missing:
            raise LayerSelectionError(
                f"store {self.store_id} holds layers {format_layers(self.stored_layers)} only (extracted with "
                f"--layers); layer {missing[0]} is not there: pick from those, or re-extract with --layers including "
                f"{missing[0]}")
        return chosen

    @cached_property
    def _layer_position(self) -> dict[int, int]:
        """model layer -> its position on the stored arrays' layer axis."""
        return {layer: i for i, layer in enumerate(self.stored_layers)}

    def segments(self, split: str | Iterable[str] | None = None) -> list[str]:
        """The committed segments (one per shard) holding examples of ``split``, in storage order."""
        return list(dict.fromkeys(self.manifest(split=split, columns=["segment"])["segment"].to_pylist()))

    def segment_array(self, segment: str, name: str = "hidden") -> zarr.Array:
        """A committed segment's zarr array (``hidden``, ``mean``, ``last``, ``logits``), read through its commit
        record: every file is checked before zarr decodes it. Values are stored values (bf16 as uint16 bits)."""
        group = self._group(segment)
        if name not in group:
            raise StoreError(f"segment {segment} of store {self.store_id} has no array {name!r} (it has: "
                             f"{', '.join(sorted(group.array_keys()))})")
        return group[name]

    def read_tokens(self, segment: str, start: int = 0, stop: int | None = None, layers: Layers = None,
                    decode: bool = True) -> torch.Tensor | np.ndarray:
        """Tokens [start, stop) of a committed segment's ``hidden`` array (the manifest's ``token_offset`` and
        ``n_tokens`` locate an example there; ``stop=None``: to the end): (L', stop - start, d). One contiguous
        read per run of consecutive layers. ``decode=False`` returns the stored numpy values (bf16 as uint16
        bits; decode later with ``store.codecs.from_storage``), e.g. to hold them compactly in a buffer; for an
        fp8/intK tier those are the values its codes decode to, in that same form."""
        array = self.segment_array(segment, "hidden")
        block = self._read_runs(lambda sl: array[sl, start:stop], layers, axis=0)
        if self.tier.quantized:  # 8-bit codes -> the logical dtype's stored form, so decode=False callers see no tier
            scale = self.segment_array(segment, SCALE_ARRAY)
            rows = scale_rows(self.tier, start, start + block.shape[1])
            block = dequantize(block, self._read_runs(lambda sl: scale[sl, rows], layers, axis=0), start,
                               self.logical_dtype, self.tier)
        return from_storage(block, self.logical_dtype) if decode else block

    def read_pooled(self, segment: str, kind: str = "mean", layers: Layers = None,
                    decode: bool = True) -> torch.Tensor | np.ndarray:
        """A committed segment's per-example ``mean`` (float32) or ``last`` (logical dtype) array, every row
        (the manifest's ``row`` indexes it): (rows, L', d)."""
        if kind not in ("mean", "last"):
            raise StoreError(f"pooled tier {kind!r}: use 'mean' or 'last'")
        array = self.segment_array(segment, kind)
        block = self._read_runs(lambda sl: array[:, sl], layers, axis=1)
        return from_storage(block, self._tier_dtype(kind)) if decode else block

    def token_ranges(self, example_id: str) -> tuple[str, list[tuple[int, int]]]:
        """Where one example's states are: (segment, [start, stop) ranges of its ``hidden`` token axis). The
        example's ``n_tokens`` states are the ranges concatenated in order: one range, or with --share-prefixes a
        shared prefix (inside an earlier example) then its own tokens (store/prefixes.py)."""
        where = self._locate(example_id)
        return where.segment, example_ranges(where.token_offset, where.n_tokens, where.prefix_offset,
                                             where.prefix_tokens)

    def hidden(self, example_id: str, layers: Layers = None) -> torch.Tensor:
        """All kept tokens of one example: (n_layers_selected, n_tokens, d) in the logical dtype (a shared prefix
        put back in front of its own tokens)."""
        segment, ranges = self.token_ranges(example_id)
        if len(ranges) == 1:
            return self.read_tokens(segment, *ranges[0], layers)
        parts = [self.read_tokens(segment, start, stop, layers, decode=False) for start, stop in ranges]
        return from_storage(np.concatenate(parts, axis=1), self.logical_dtype)  # (L', n_tokens, d)

    def mean(self, example_ids: Sequence[str] | None = None, layers: Layers = None) -> torch.Tensor:
        """Per-example mean over tokens: (N, n_layers_selected, d) float32, in manifest order by default."""
        return self._per_example("mean", example_ids, layers)

    def last(self, example_ids: Sequence[str] | None = None, layers: Layers = None) -> torch.Tensor:
        """Per-example last-token state: (N, n_layers_selected, d) in the logical dtype."""
        return self._per_example("last", example_ids, layers)

    def logits(self, example_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Next-token logits at the last prompt position: (N, V). Needs a store extracted with logits."""
        if not self.info["capture"].get("logits"):
            raise StoreError(f"store {self.store_id} has no logits: re-extract with --logits")
        return self._per_example("logits", example_ids, None)

    def token_ids(self, example_id: str) -> torch.Tensor:
        """The kept token ids of one example, aligned with the token axis of ``hidden(example_id)``: (n_tokens,)
        int32. Needs a store extracted with --store-token-ids (off by default: ids decode back to the text)."""
        if not self.info["capture"].get("token_ids"):
            raise StoreError(f"store {self.store_id} has no token ids: re-extract with --store-token-ids")
        segment, ranges = self.token_ranges(example_id)
        array = self._group(segment)["token_ids"]  # aligned with hidden's token axis, checked against the record
        ids = np.concatenate([array[start:stop] for start, stop in ranges])  # (n,) int32
        return torch.from_numpy(np.ascontiguousarray(ids))

    def _tier_dtype(self, name: str) -> str:
        return "float32" if name == "mean" else self.logical_dtype

    def _per_example(self, name: str, example_ids: Sequence[str] | None, layers: Layers) -> torch.Tensor:
        if example_ids is None:
            example_ids = self.manifest(columns=["example_id"])["example_id"].to_pylist()
        by_segment: dict[str, list[tuple[int, int]]] = {}  # segment -> [(position in output, row)]
        for position, eid in enumerate(example_ids):
            where = self._locate(eid)
            segment, row = where.segment, where.row
            by_segment.setdefault(segment, []).append((position, row))
        parts: list[tuple[list[int], torch.Tensor]] = []
        for segment, items in by_segment.items():
            array = self._group(segment)[name]
            rows = np.array([row for _, row in items])
            lo, hi = int(rows.min()), int(rows.max()) + 1
            if name == "logits":
                stored = array[lo:hi]  # (rows, V)
            else:
                stored = self._read_runs(partial(_rows_then_layers, array, lo, hi), layers, axis=1)  # (rows, L', d)
            block = from_storage(stored, self._tier_dtype(name))
            parts.append(([p for p, _ in items], block[torch.from_numpy(rows - lo)]))
        if not parts:
            return torch.empty(0)
        out = torch.empty((len(example_ids), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
        for positions, block in parts:
            out[torch.tensor(positions)] = block
        return out

    def _read_runs(self, read, layers: Layers, axis: int) -> np.ndarray:
        """``read(layer_slice)`` once per run of consecutive selected layers, joined on ``axis`` (stored values)."""
        if layers is None:
            return np.asarray(read(slice(None)))
        positions = [self._layer_position[layer] for layer in self.select_layers(layers)]
        blocks = [np.asarray(read(run)) for run in layer_runs(positions)]
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=axis)

    # ---- summary ----------------------------------------------------------------------------------

    def summary(self) -> dict:
        """What `probecache store info` prints; computed from committed parts only."""
        committed = committed_part_files(self.layout.manifests)
        stats = [part_stats(p) for p in committed]
        info, model, dataset = self.info, self.info["model"], self.info["dataset"]
        return {
            "store_id": self.store_id,
            "path": self.url or str(self.path),
            "model": model["name"],
            "model_weights": model["weights_id"],
            "dataset": dataset["name"],
            "splits": dataset["split_sizes"],
            "label_names": dataset["label_names"],
            "n_examples": sum(s.get("n_examples", 0) for s in stats),
            "n_examples_planned": info["plan"]["n_examples"],
            "n_tokens": sum(s.get("n_tokens", 0) for s in stats),
            # on hidden's token axes: fewer than n_tokens when --share-prefixes stored shared prefixes once
            "stored_tokens": sum(s.get("stored_tokens", s.get("n_tokens", 0)) for s in stats),
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "logical_dtype": self.logical_dtype,
            "tier": self.tier.name,
            "bytes_stored": sum(s.get("bytes_stored", 0) for s in stats),
            "bytes_raw": sum(s.get("bytes_raw", 0) for s in stats),
            "shards_total": info["plan"]["n_shards"],
            "shards_committed": len(committed),
            "complete": len(committed) == info["plan"]["n_shards"],
            "created": info["created"],
            "prompt_format": info["identity"]["prompt_format"],
            "max_tokens": info["identity"]["max_tokens"],
            "capture": info["capture"],
            "layers": format_layers(self.stored_layers) if self.stored_layers != list(range(self.n_layers)) else "all",
            "tokens": self.token_policy.name,
        }


def _rows_then_layers(array, lo: int, hi: int, layers: slice):
    return array[lo:hi, layers]


def list_stores(root: str | Path) -> list[dict]:
    """Summaries of every store directly under ``root`` (a folder or an object-store URL: folders holding a
    store.json), newest first; a damaged store is listed with what is wrong instead of failing the listing."""
    parsed = parse_root(root)
    if isinstance(parsed, Path) and not parsed.is_dir():
        raise StoreError(f"store root {parsed} does not exist: pass --root or set PROBECACHE_ROOT")
    top = open_root(root)

    def summary(name: str) -> dict | None:
        try:
            child = top.child(check_store_name(name))
        except StoreError:
            return None  # not a name the extractor writes
        if child.info("store.json") is None:
            return None
        try:
            return open_store(child.url).summary()
        except StoreError as e:
            return {"store_id": name, "path": child.url, "damaged": str(e), "created": ""}

    with ThreadPoolExecutor(8) as pool:  # one store.json (and a manifests listing) per store: latency-bound remotely
        found = [s for s in pool.map(summary, top.list_dir("")[0]) if s is not None]
    return sorted(found, key=lambda s: s["created"], reverse=True)
