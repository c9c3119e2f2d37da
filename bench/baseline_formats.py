"""The storage formats users would otherwise pick for every hidden state, written the straightforward way.

Each format has a writer (``write_batch(example_ids, hidden, lengths)`` per forward batch, then ``close()``)
and a reader with one protocol, also implemented for a probecache store by :class:`StoreReader`:

- ``example_ids`` (the format's own order: the order examples were written) and ``position[example_id]``;
- ``read_example(i) -> (L+1, n, d)`` tensor, every layer of example ``i``'s real tokens;
- ``read_layer(l) -> (tokens, d)`` tensor, layer ``l`` of every example, concatenated in position order;
- ``bytes_on_disk()`` (file sizes) and ``bytes_allocated()`` (blocks actually allocated: sparse files differ).

Formats (``FORMATS``):

- ``torch_save``: one ``torch.save`` file per example, the model's dtype (bf16) (L+1, n, d), ``.clone()``d so a
  view does not save the whole batch's storage;
- ``npz``: one ``np.savez_compressed`` file per example, float16 (L+1, n, d): the usual research-code pattern;
- ``arrow``: an HF ``datasets`` table, one row per token (``Array2D((L+1, d), "float16")`` + example index +
  position), one ``save_to_disk`` shard per buffer of tokens, read back with ``load_from_disk`` +
  ``concatenate_datasets`` + ``.with_format("numpy")`` (what SAELens writes);
- ``hdf5``: one h5py file, a flat token axis (tokens, L+1, d) float16 grown with ``resize`` per batch,
  ``chunks=True`` and no compression (h5py's defaults), plus an offsets dataset (what probelab writes);
- ``padded``: one dense ``np.lib.format.open_memmap`` .npy (N, L+1, T_max, d) float16, T_max = the longest
  example, plus the lengths.

numpy has no bfloat16, so the numpy-based formats (all but ``torch_save``) store float16 (float32 for fp32
models): the same 2 bytes per value, but lossy against probecache's exact bf16 bits (fp16 has 3 more mantissa
bits and 3 fewer exponent bits; SmolLM2's largest activation, ~2.6e4, is inside fp16's range of 65,504, so the
round trip is a rounding, not a clipping). Each format keeps ``index.json``: the example ids in position order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import disk_bytes  # bench/common.py (bench/ is on sys.path)
from probecache.lm.tokens import pad_batch
from probecache.store.codecs import LOGICAL_DTYPES, from_storage, to_storage
from probecache.train.loaders import Batch

FORMATS = ("torch_save", "npz", "arrow", "hdf5", "padded")
INDEX = "index.json"


@dataclass(frozen=True)
class Shape:
    n_layers: int  # L+1 hidden-state tensors per token
    hidden_size: int  # d
    n_examples: int  # N (the padded format allocates it up front, as a user knowing the dataset would)
    t_max: int  # the longest example in tokens (padded format)
    dtype: torch.dtype  # the model's activation dtype


def numpy_dtype(dtype: torch.dtype) -> type[np.generic]:
    """What the numpy-based formats store: float16 for 16-bit models (numpy has no bf16), float32 for fp32."""
    return np.float32 if dtype == torch.float32 else np.float16


def _as_numpy(hidden: torch.Tensor, dtype: type[np.generic]) -> np.ndarray:
    """One conversion per batch (bf16 -> fp16 rounds to nearest), then plain numpy from there on."""
    return hidden.to(torch.float32 if dtype == np.float32 else torch.float16).numpy()


# ---- writers -------------------------------------------------------------------------------------------------


class _Writer:
    def __init__(self, folder: Path, shape: Shape):
        self.folder, self.shape = Path(folder), shape
        self.folder.mkdir(parents=True, exist_ok=True)
        self.example_ids: list[str] = []
        self.np_dtype = numpy_dtype(shape.dtype)

    def write_batch(self, example_ids: list[str], hidden: torch.Tensor, lengths: list[int]) -> None:
        """``hidden`` (B, L+1, T, d) in the model's dtype, right-padded; ``lengths[b]`` real tokens of row b."""
        raise NotImplementedError

    def close(self) -> None:
        (self.folder / INDEX).write_text(json.dumps(self.example_ids))


class TorchSaveWriter(_Writer):
    def write_batch(self, example_ids, hidden, lengths):
        for b, (eid, n) in enumerate(zip(example_ids, lengths, strict=True)):
            # clone: torch.save of a view writes the whole (B, L+1, T, d) storage it views
            torch.save(hidden[b, :, :n].clone(), self.folder / f"{len(self.example_ids):06d}.pt")  # (L+1, n, d)
            self.example_ids.append(eid)


class NpzWriter(_Writer):
    def write_batch(self, example_ids, hidden, lengths):
        values = _as_numpy(hidden, self.np_dtype)  # (B, L+1, T, d)
        for b, (eid, n) in enumerate(zip(example_ids, lengths, strict=True)):
            np.savez_compressed(self.folder / f"{len(self.example_ids):06d}.npz", hidden=values[b, :, :n])
            self.example_ids.append(eid)


class ArrowWriter(_Writer):
    """SAELens-style: buffer token rows, then ``Dataset.from_dict(...).save_to_disk(shard)`` per full buffer."""

    def __init__(self, folder: Path, shape: Shape, buffer_tokens: int = 4096):
        super().__init__(folder, shape)
        from datasets import Array2D, Features, Value, disable_progress_bars

        disable_progress_bars()  # save_to_disk draws a bar per shard on stderr
        name = np.dtype(self.np_dtype).name
        self.features = Features({"acts": Array2D((shape.n_layers, shape.hidden_size), name),
                                  "example": Value("int32"), "position": Value("int32")})
        self.buffer_tokens = buffer_tokens
        self._acts: list[np.ndarray] = []  # each (n, L+1, d)
        self._example: list[np.ndarray] = []
        self._buffered = 0
        self.shards = 0
        self.offsets: list[int] = []  # first row of each example in the concatenated table
        self._rows = 0

    def write_batch(self, example_ids, hidden, lengths):
        values = _as_numpy(hidden, self.np_dtype)  # (B, L+1, T, d)
        for b, (eid, n) in enumerate(zip(example_ids, lengths, strict=True)):
            self._acts.append(values[b, :, :n].transpose(1, 0, 2))  # (n, L+1, d): one row per token
            self._example.append(np.full(n, len(self.example_ids), dtype=np.int32))
            self.offsets.append(self._rows)
            self._rows += n
            self._buffered += n
            self.example_ids.append(eid)
        if self._buffered >= self.buffer_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._acts:
            return
        from datasets import Dataset

        example = np.concatenate(self._example)
        position = np.concatenate([np.arange(len(e), dtype=np.int32) for e in self._example])
        data = {"acts": np.concatenate(self._acts), "example": example, "position": position}  # acts (rows, L+1, d)
        Dataset.from_dict(data, features=self.features).save_to_disk(str(self.folder / f"shard-{self.shards:05d}"))
        self.shards += 1
        self._acts, self._example, self._buffered = [], [], 0

    def close(self):
        self._flush()
        super().close()
        (self.folder / "offsets.json").write_text(json.dumps(self.offsets + [self._rows]))


class Hdf5Writer(_Writer):
    """probelab-style: one (tokens, L+1, d) dataset grown per batch, h5py defaults (auto chunks, no compression)."""

    def __init__(self, folder: Path, shape: Shape):
        super().__init__(folder, shape)
        import h5py

        self.file = h5py.File(self.folder / "activations.h5", "w")
        width = (shape.n_layers, shape.hidden_size)
        self.hidden = self.file.create_dataset("hidden", shape=(0, *width), maxshape=(None, *width),
                                               dtype=self.np_dtype, chunks=True)
        self.offsets = self.file.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=True)

    def write_batch(self, example_ids, hidden, lengths):
        values = _as_numpy(hidden, self.np_dtype)  # (B, L+1, T, d)
        tokens = np.concatenate([values[b, :, :n].transpose(1, 0, 2) for b, n in enumerate(lengths)])  # (sum n, L+1, d)
        t0, k0 = self.hidden.shape[0], self.offsets.shape[0]
        self.hidden.resize(t0 + len(tokens), axis=0)
        self.hidden[t0:] = tokens
        self.offsets.resize(k0 + len(lengths), axis=0)
        self.offsets[k0:] = t0 + np.cumsum(lengths)  # ends; example i is offsets[i]:offsets[i + 1]
        self.example_ids.extend(example_ids)

    def close(self):
        self.file.close()
        super().close()


class PaddedWriter(_Writer):
    """One dense (N, L+1, T_max, d) memory-mapped .npy, filled example by example, plus the lengths."""

    def __init__(self, folder: Path, shape: Shape):
        super().__init__(folder, shape)
        self.values = np.lib.format.open_memmap(self.folder / "hidden.npy", mode="w+", dtype=self.np_dtype,
                                                shape=(shape.n_examples, shape.n_layers, shape.t_max,
                                                       shape.hidden_size))
        self.lengths = np.zeros(shape.n_examples, dtype=np.int64)

    def write_batch(self, example_ids, hidden, lengths):
        values = _as_numpy(hidden, self.np_dtype)  # (B, L+1, T, d)
        for b, (eid, n) in enumerate(zip(example_ids, lengths, strict=True)):
            i = len(self.example_ids)
            self.values[i, :, :n] = values[b, :, :n]  # the rest stays zero (unwritten: a hole in a sparse file)
            self.lengths[i] = n
            self.example_ids.append(eid)

    def close(self):
        self.values.flush()
        del self.values
        np.save(self.folder / "lengths.npy", self.lengths)
        super().close()


WRITERS = {"torch_save": TorchSaveWriter, "npz": NpzWriter, "arrow": ArrowWriter, "hdf5": Hdf5Writer,
           "padded": PaddedWriter}


def make_writer(name: str, folder: Path, shape: Shape) -> _Writer:
    return WRITERS[name](folder, shape)


def forward_and_write(model, batches, pad_id: int, writer: _Writer) -> float:
    """A user's extraction loop: forward each batch, stack its hidden states, hand them to ``writer``; then
    close it. Returns the seconds of the whole loop (the writer's close included)."""
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            ids, mask = pad_batch([p.token_ids for p in batch], pad_id, str(model.device))  # (B, T)
            out = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            hidden = torch.stack(out.hidden_states, dim=1).cpu()  # (B, L+1, T, d)
            writer.write_batch([p.example.example_id for p in batch], hidden, [p.n_tokens for p in batch])
    writer.close()
    return time.perf_counter() - started


# ---- readers -------------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.example_ids: list[str] = json.loads((self.folder / INDEX).read_text())
        self.position = {eid: i for i, eid in enumerate(self.example_ids)}

    def __len__(self) -> int:
        return len(self.example_ids)

    def bytes_on_disk(self) -> int:
        return disk_bytes(self.folder)[0]

    def bytes_allocated(self) -> int:
        return disk_bytes(self.folder)[1]

    def read_example(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def read_layer(self, layer: int) -> torch.Tensor:
        """The straightforward way for per-example files: read each example, keep one layer."""
        return torch.cat([self.read_example(i)[layer] for i in range(len(self))])  # (tokens, d)


class TorchSaveReader(_Reader):
    def read_example(self, i):
        return torch.load(self.folder / f"{i:06d}.pt")  # (L+1, n, d), weights_only (plain tensors)


class NpzReader(_Reader):
    def read_example(self, i):
        with np.load(self.folder / f"{i:06d}.npz") as f:
            return torch.from_numpy(f["hidden"])  # (L+1, n, d)


class ArrowReader(_Reader):
    def __init__(self, folder: Path, rows_per_read: int = 4096):
        super().__init__(folder)
        from datasets import concatenate_datasets, load_from_disk

        shards = sorted(p for p in self.folder.iterdir() if p.name.startswith("shard-"))
        self.table = concatenate_datasets([load_from_disk(str(p)) for p in shards]).with_format("numpy")
        self.offsets = json.loads((self.folder / "offsets.json").read_text())
        self.rows_per_read = rows_per_read

    def read_example(self, i):
        # datasets' numpy formatter widens floats to float32 by default: that is what a user gets
        rows = self.table[self.offsets[i] : self.offsets[i + 1]]["acts"]  # (n, L+1, d)
        return torch.from_numpy(np.ascontiguousarray(rows.transpose(1, 0, 2)))

    def read_layer(self, layer):
        # a fixed-shape row holds every layer of a token: reading one layer decodes them all, in row slices
        n = self.offsets[-1]
        parts = [self.table[a : min(a + self.rows_per_read, n)]["acts"][:, layer]
                 for a in range(0, n, self.rows_per_read)]
        return torch.from_numpy(np.concatenate(parts))  # (tokens, d)


class Hdf5Reader(_Reader):
    def __init__(self, folder: Path):
        super().__init__(folder)
        import h5py

        self.file = h5py.File(self.folder / "activations.h5", "r")
        self.hidden = self.file["hidden"]
        self.offsets = self.file["offsets"][:]

    def read_example(self, i):
        rows = self.hidden[self.offsets[i] : self.offsets[i + 1]]  # (n, L+1, d)
        return torch.from_numpy(np.ascontiguousarray(rows.transpose(1, 0, 2)))

    def read_layer(self, layer):
        return torch.from_numpy(self.hidden[:, layer])  # (tokens, d): one hyperslab read

    def close(self) -> None:
        self.file.close()


class PaddedReader(_Reader):
    def __init__(self, folder: Path):
        super().__init__(folder)
        self.values = np.load(self.folder / "hidden.npy", mmap_mode="r")  # (N, L+1, T_max, d)
        self.lengths = np.load(self.folder / "lengths.npy")

    def read_example(self, i):
        return torch.from_numpy(np.array(self.values[i, :, : self.lengths[i]]))  # (L+1, n, d), copied out

    def read_layer(self, layer):
        block = np.asarray(self.values[:, layer])  # (N, T_max, d)
        keep = np.arange(block.shape[1])[None, :] < self.lengths[:, None]  # (N, T_max)
        return torch.from_numpy(block[keep])  # (tokens, d), position order


READERS = {"torch_save": TorchSaveReader, "npz": NpzReader, "arrow": ArrowReader, "hdf5": Hdf5Reader,
           "padded": PaddedReader}


def open_reader(name: str, folder: Path) -> _Reader:
    return READERS[name](folder)


class StoreReader:
    """The same protocol over a probecache store (positions = manifest order)."""

    def __init__(self, store):
        self.store = store
        table = store.manifest(columns=["example_id", "segment", "token_offset", "n_tokens"])
        self.example_ids = table["example_id"].to_pylist()
        self.position = {eid: i for i, eid in enumerate(self.example_ids)}
        self._rows = list(zip(*(table[c].to_pylist() for c in ("segment", "token_offset", "n_tokens")), strict=True))

    def __len__(self) -> int:
        return len(self.example_ids)

    def bytes_on_disk(self) -> int:
        return disk_bytes(self.store.path)[0]

    def bytes_allocated(self) -> int:
        return disk_bytes(self.store.path)[1]

    def hidden_bytes(self) -> int:
        """The ``hidden`` arrays alone (the store also holds pooled means, last-token states and manifests)."""
        segments = self.store.path / "segments"
        return sum(disk_bytes(p / "hidden")[0] for p in segments.iterdir() if (p / "hidden").is_dir())

    def read_example(self, i):
        return self.store.hidden(self.example_ids[i])  # (L+1, n, d)

    def read_layer(self, layer):
        blocks: dict[str, np.ndarray] = {}
        parts = []
        for segment, offset, n in self._rows:
            if segment not in blocks:  # one read per segment: the layer's inner chunks only
                blocks = {segment: self.store.read_tokens(segment, layers=[layer], decode=False)[0]}  # (T_seg, d)
            parts.append(blocks[segment][offset : offset + n])
        return from_storage(np.concatenate(parts), self.store.logical_dtype)  # (tokens, d)


# ---- training batches ----------------------------------------------------------------------------------------


class ReaderBatches:
    """A batch source over any reader, with the protocol of ``probecache.train.data.TokenBatches``.

    Per epoch the examples are visited in a random order seeded with (seed, epoch), read one by one
    (``read_example``) and padded into batches of ``batch_size`` in ``dtype`` (the store loader's dtype, so the
    probes compute on identical inputs): hidden (B, L+1, T, d), mask (B, T), y (B,).
    """

    tier = "tokens"

    def __init__(self, reader, example_ids: list[str], labels: np.ndarray, batch_size: int, shuffle: bool,
                 seed: int = 0, dtype: torch.dtype = torch.bfloat16):
        self.reader, self.example_ids = reader, list(example_ids)
        missing = [e for e in self.example_ids if e not in reader.position]
        if missing:
            raise KeyError(f"{len(missing)} example(s) are not in this format's files, e.g. {missing[:3]}")
        self.positions = np.array([reader.position[e] for e in self.example_ids], dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.batch_size, self.shuffle, self.seed, self.dtype = batch_size, shuffle, seed, dtype

    def __len__(self) -> int:
        return len(self.example_ids)

    @property
    def n_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        n = len(self)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self._collate(idx, [self.reader.read_example(int(self.positions[i])) for i in idx])

    def _collate(self, idx: np.ndarray, items: list[torch.Tensor]) -> Batch:
        # in numpy on the stored values, as the store's loader does (torch copies into strided slices stall)
        arrays = [to_storage(t) for t in items]  # each (L+1, n, d); bf16 as uint16 bits
        t_max = max(a.shape[1] for a in arrays)
        first = arrays[0]
        values = np.zeros((len(arrays), first.shape[0], t_max, first.shape[2]), dtype=first.dtype)  # (B, L+1, T, d)
        mask = torch.zeros((len(arrays), t_max), dtype=torch.bool)
        for b, a in enumerate(arrays):
            values[b, :, : a.shape[1]] = a
            mask[b, : a.shape[1]] = True
        logical = next(name for name, (td, _) in LOGICAL_DTYPES.items() if td == items[0].dtype)
        hidden = from_storage(values, logical)
        if hidden.dtype != self.dtype:
            hidden = hidden.to(self.dtype)
        return Batch(hidden=hidden, mask=mask, y=self.labels[torch.from_numpy(idx)],
                     example_ids=[self.example_ids[i] for i in idx])
