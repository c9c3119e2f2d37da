"""Reading a store: the manifest, one example's hidden states, pooled arrays, logits.

Readers only see committed shards (those with a manifest part); in-progress or orphaned segments are
invisible. Array reads slice contiguous layer ranges: zarr integer-list selection is ~40x slower.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zarr
from probecache.manifests.schema import committed_part_files, part_stats, read_parts

from .codecs import from_storage
from .errors import StoreError
from .layout import FORMAT_VERSION, StoreLayout

Layers = int | slice | Sequence[int] | None


def open_store(path_or_url: str | Path, cache_size: str | int | None = None) -> Store:
    """Open a store for reading: a folder ``<root>/<store_id>`` (or file:// URL), or an object-store URL
    ``s3://bucket/prefix/<store_id>`` (also gs://, memory://) read through a size-capped local mirror
    (``cache_size``, default $PROBECACHE_REMOTE_CACHE_SIZE or 20G; see remote_reader.py)."""
    from .remote import is_remote, repair_url

    text = repair_url(path_or_url)
    if is_remote(text):
        from .remote_reader import open_remote_store

        return open_remote_store(text, cache_size)
    path = Path(text.removeprefix("file://")).expanduser()
    if not (path / "store.json").is_file():
        raise StoreError(f"{path} is not a probecache store (no store.json): pass <root>/<store_id>")
    return Store(path)


class Store:
    def __init__(self, path: Path):
        self.layout = StoreLayout(Path(path))
        self.info: dict = json.loads(self.layout.store_json.read_text())
        if self.info.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format {self.info.get('format_version')} is not supported "
                f"(this probecache reads format {FORMAT_VERSION}): upgrade probecache"
            )
        self._groups: dict[str, zarr.Group] = {}

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

    @property
    def label_names(self) -> list[str]:
        return self.info["dataset"]["label_names"]

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

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
        return read_parts(self.layout.manifests, columns=columns, filter=expr)

    @cached_property
    def _index(self) -> dict[str, tuple[str, int, int, int]]:
        """example_id -> (segment, token_offset, n_tokens, row), built once from the manifest."""
        t = self.manifest(columns=["example_id", "segment", "token_offset", "n_tokens", "row"])
        cols = [t[c].to_pylist() for c in ("example_id", "segment", "token_offset", "n_tokens", "row")]
        return {eid: (seg, off, n, row) for eid, seg, off, n, row in zip(*cols, strict=True)}

    def _locate(self, example_id: str) -> tuple[str, int, int, int]:
        try:
            return self._index[example_id]
        except KeyError:
            raise StoreError(f"example {example_id!r} is not in store {self.store_id} (or not committed)") from None

    def _group(self, segment: str) -> zarr.Group:
        if segment not in self._groups:
            self._groups[segment] = zarr.open_group(str(self.layout.segment(segment)), mode="r")
        return self._groups[segment]

    # ---- arrays -----------------------------------------------------------------------------------

    def hidden(self, example_id: str, layers: Layers = None) -> torch.Tensor:
        """All kept tokens of one example: (n_layers_selected, n_tokens, d) in the logical dtype."""
        segment, offset, n, _ = self._locate(example_id)
        array = self._group(segment)["hidden"]
        return self._read_layers(lambda sl: array[sl, offset : offset + n], layers, self.logical_dtype)

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

    def _per_example(self, name: str, example_ids: Sequence[str] | None, layers: Layers) -> torch.Tensor:
        if example_ids is None:
            example_ids = self.manifest(columns=["example_id"])["example_id"].to_pylist()
        by_segment: dict[str, list[tuple[int, int]]] = {}  # segment -> [(position in output, row)]
        for position, eid in enumerate(example_ids):
            segment, _, _, row = self._locate(eid)
            by_segment.setdefault(segment, []).append((position, row))
        logical = "float32" if name == "mean" else self.logical_dtype
        parts: list[tuple[list[int], torch.Tensor]] = []
        for segment, items in by_segment.items():
            array = self._group(segment)[name]
            rows = np.array([row for _, row in items])
            lo, hi = int(rows.min()), int(rows.max()) + 1
            if name == "logits":
                block = from_storage(array[lo:hi], logical)  # (rows, V)
            else:  # (rows, layers, d)
                block = self._read_layers(partial(_rows_then_layers, array, lo, hi), layers, logical, axis=1)
            parts.append(([p for p, _ in items], block[torch.from_numpy(rows - lo)]))
        if not parts:
            return torch.empty(0)
        out = torch.empty((len(example_ids), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
        for positions, block in parts:
            out[torch.tensor(positions)] = block
        return out

    def _read_layers(self, read, layers: Layers, logical: str, axis: int = 0) -> torch.Tensor:
        """Read a layer selection as contiguous slices (one read per run of consecutive layers)."""
        if layers is None:
            return from_storage(read(slice(None)), logical)
        if isinstance(layers, slice):
            return from_storage(read(layers), logical)
        if isinstance(layers, int):
            layers = [layers]
        layers = [layer + self.n_layers if layer < 0 else layer for layer in layers]
        if any(not 0 <= layer < self.n_layers for layer in layers):
            raise StoreError(f"layers {layers} out of range: this store has layers 0..{self.n_layers - 1}")
        runs: list[list[int]] = []
        for layer in layers:
            if runs and layer == runs[-1][-1] + 1:
                runs[-1].append(layer)
            else:
                runs.append([layer])
        blocks = [from_storage(read(slice(r[0], r[-1] + 1)), logical) for r in runs]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=axis)

    # ---- summary ----------------------------------------------------------------------------------

    def summary(self) -> dict:
        """What `probecache store info` prints; computed from committed parts only."""
        committed = committed_part_files(self.layout.manifests)
        stats = [part_stats(p) for p in committed]
        info, model, dataset = self.info, self.info["model"], self.info["dataset"]
        return {
            "store_id": self.store_id,
            "path": str(self.path),
            "model": model["name"],
            "model_weights": model["weights_id"],
            "dataset": dataset["name"],
            "splits": dataset["split_sizes"],
            "label_names": dataset["label_names"],
            "n_examples": sum(s.get("n_examples", 0) for s in stats),
            "n_examples_planned": info["plan"]["n_examples"],
            "n_tokens": sum(s.get("n_tokens", 0) for s in stats),
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "logical_dtype": self.logical_dtype,
            "bytes_stored": sum(s.get("bytes_stored", 0) for s in stats),
            "bytes_raw": sum(s.get("bytes_raw", 0) for s in stats),
            "shards_total": info["plan"]["n_shards"],
            "shards_committed": len(committed),
            "complete": len(committed) == info["plan"]["n_shards"],
            "created": info["created"],
            "prompt_format": info["identity"]["prompt_format"],
            "max_tokens": info["identity"]["max_tokens"],
            "capture": info["capture"],
        }


def _rows_then_layers(array, lo: int, hi: int, layers: slice):
    return array[lo:hi, layers]


def list_stores(root: str | Path) -> list[dict]:
    """Summaries of every store directly under ``root`` (folders holding a store.json), newest first.
    ``root`` may be an object-store URL (s3://bucket/prefix)."""
    from .remote import is_remote, repair_url

    if is_remote(repair_url(root)):
        from .remote_reader import list_remote_stores

        return list_remote_stores(repair_url(root))
    root = Path(str(root).removeprefix("file://")).expanduser()
    if not root.is_dir():
        raise StoreError(f"store root {root} does not exist: pass --root or set PROBECACHE_ROOT")
    found = [open_store(p).summary() for p in sorted(root.iterdir()) if (p / "store.json").is_file()]
    return sorted(found, key=lambda s: s["created"], reverse=True)
