"""Labelled text datasets for probes: one registry, one set of rules for bad rows and split carving.

    ds = load_dataset("sst2", data_dir="../shared/data")      # or PROBECACHE_DATA_DIR
    ds.splits["train"][0]  ->  Example(example_id="train-0", split="train", text=..., label=0)
    ds.fingerprint()       ->  sha256 of the content, part of the extraction cache key

Three kinds of dataset (see `list_datasets()`):
- embedded: files shipped inside pip packages installed with --no-deps, so they work offline
  (rotten_tomatoes, vader_movies, toxigen);
- file: benchmark copies read from a data directory laid out like `../shared/data` (jigsaw, sst2, ...),
  with a Hugging Face Hub fallback where a public parquet copy exists;
- generic: `csv:PATH`, `tsv:PATH`, `jsonl:PATH`, `parquet:PATH` with text/label(/id/split) columns.

Rules every dataset follows, so probes are comparable across them:
- Bad rows (empty text, missing or unknown label, a repeated example_id) are excluded and reported in
  `Dataset.bad_rows`; `strict=True` turns any of them into an error. A repeated *text* is not a bad row:
  benchmarks contain real duplicates and dropping them would change published split sizes.
- Labels are parsed by type (`dataset_sources.label_str`): 1, 1.0, "1" and "1.0" are one class; null, NaN,
  blank and the spellings NaN/None/null are a missing label. In a generic file, a label or text of the
  wrong type (a boolean or list label, a number as text) is an error naming the rows, never a class
  spelled by its Python repr and never a silently dropped row.
- Rows a source documents as "not data" (Rotten Tomatoes plot synopses, VADER's neutral snippets,
  Kaggle's unscored -1 test rows) are dropped silently and counted in `Dataset.source`.
- A split without a file is carved, never from test: stratified by label, each label's examples ordered
  by sha256(f"{seed}:{example_id}") and the first round(fraction * n) taken (half up). It depends on the
  ids only, not on file order, so a shuffled file carves the same way.
- Every split keeps file order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .dataset_files import FILE_SOURCES, load_files
from .dataset_sources import (
    GENERIC_KINDS,
    SPLITS,
    DatasetError,
    RawDataset,
    SourceRequest,
    load_generic,
    load_rotten_tomatoes,
    load_toxigen,
    load_vader_movies,
)

__all__ = [
    "DEFAULT_DATASET",
    "REGISTRY",
    "SPLITS",
    "BadRow",
    "Dataset",
    "DatasetError",
    "DatasetInfo",
    "Example",
    "list_datasets",
    "load_dataset",
    "resolve_data_dir",
]

DEFAULT_DATASET = "rotten_tomatoes"
DATA_DIR_ENV = "PROBECACHE_DATA_DIR"


@dataclass(frozen=True)
class Example:
    example_id: str  # stable and unique within the dataset: the source's id, else "<split>-<row in its file>"
    split: str
    text: str
    label: int  # index into Dataset.label_names
    labels: tuple[int, ...] = ()  # 0/1 per Dataset.multilabel_names (Jigsaw's six), () otherwise


@dataclass(frozen=True)
class BadRow:
    split: str  # the split of the file it was read from ("train" for a file that is carved)
    example_id: str
    reason: str  # "empty text" | "missing label" | "unknown label 'x'" | "duplicate id"


@dataclass(frozen=True)
class Dataset:
    name: str
    label_names: tuple[str, ...]
    multilabel_names: tuple[str, ...]
    splits: dict[str, list[Example]]  # in SPLITS order; only the splits loaded
    bad_rows: tuple[BadRow, ...]
    source: str

    def fingerprint(self) -> str:
        """Content hash: the same examples, ids, labels and label names give the same hex on any machine
        (file paths in `source` are deliberately left out)."""
        h = hashlib.sha256()

        def feed(obj: object) -> None:
            # One JSON document per line: unambiguous however texts or ids are spelled.
            h.update(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")

        feed([self.name, list(self.label_names), list(self.multilabel_names)])
        for split in SPLITS:
            for ex in self.splits.get(split, ()):
                text_hash = hashlib.sha256(ex.text.encode()).hexdigest()
                feed([ex.split, ex.example_id, text_hash, ex.label, list(ex.labels)])
        return h.hexdigest()


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str  # "embedded" | "file" | "generic"
    available: bool
    detail: str  # where it reads from, or why it is unavailable
    split_sizes: dict[str, int]  # loadable splits after carving; {} when unavailable
    description: str


# ----------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RegistryEntry:
    loader: Callable[[SourceRequest], RawDataset]
    kind: str
    description: str


REGISTRY: dict[str, RegistryEntry] = {
    "rotten_tomatoes": RegistryEntry(
        load_rotten_tomatoes,
        "embedded",
        "Rotten Tomatoes review snippets, fresh/rotten -> positive/negative (~12.8k); carved 80/10/10",
    ),
    "vader_movies": RegistryEntry(
        load_vader_movies,
        "embedded",
        "VADER movie-review snippets, mean human rating > 0 / < 0 (neutral excluded); carved 80/10/10",
    ),
    "toxigen": RegistryEntry(
        load_toxigen,
        "embedded",
        "ToxiGen sample, 100 toxic + 100 benign statements about identity groups; carved 70/15/15",
    ),
    "jigsaw": RegistryEntry(
        load_files,
        "file",
        "Jigsaw toxic comments, binary toxic + the six Kaggle labels (shared subset is toxic-enriched, "
        "~40 %); validation carved from train",
    ),
    "jigsaw_balanced": RegistryEntry(
        load_files,
        "file",
        "Jigsaw binary toxic: first 20k Kaggle train rows (natural ~10 %), 50/50 balanced test",
    ),
    "toxicchat": RegistryEntry(
        load_files,
        "file",
        "ToxicChat 0124 user prompts to a chatbot, toxicity label; validation carved from train",
    ),
    "sst2": RegistryEntry(
        load_files, "file", "SST-2 (GLUE) sentences and phrases, binary sentiment; dev = validation"
    ),
    "imdb": RegistryEntry(
        load_files,
        "file",
        "IMDB reviews, binary sentiment (the reduced copy is biased to short reviews); validation carved",
    ),
    "emotion": RegistryEntry(
        load_files, "file", "dair-ai/emotion tweets, 6 emotions (16k/2k/2k, official splits)"
    ),
}
assert set(FILE_SOURCES) <= set(REGISTRY)


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data directory: the argument, else $PROBECACHE_DATA_DIR, else None (no directory)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV, "").strip() or None
    return Path(chosen).expanduser().resolve() if chosen is not None else None


# ----------------------------------------------------------------------------------------- loading


def load_dataset(
    name: str,
    splits: Sequence[str] | None = None,
    *,
    data_dir: str | Path | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    id_col: str | None = None,
    strict: bool = False,
    validation_fraction: float | None = None,
    seed: int = 0,
) -> Dataset:
    """Load `name` (a registry name or `csv:PATH` etc.). `splits=None` loads every split that exists
    (train must); naming a split makes its absence an error. `validation_fraction=None` uses the
    dataset's own (0.1; toxigen 0.15) and only matters where validation is carved."""
    wanted = _check_splits(splits)
    kind, _, path = name.partition(":")
    if path and kind in GENERIC_KINDS:
        file = Path(path).expanduser().resolve()
        raw = load_generic(kind, file, text_col, label_col, id_col)
        name = f"{kind}:{file}"
    else:
        entry = REGISTRY.get(name)
        if entry is None:
            forms = ", ".join(f"{k}:PATH" for k in GENERIC_KINDS)
            raise DatasetError(f"unknown dataset '{name}': choose one of {', '.join(REGISTRY)}, or {forms}")
        columns = {"--text-col": text_col, "--label-col": label_col, "--id-col": id_col}
        given = [flag for flag, value in columns.items() if value is not None]
        if given:
            raise DatasetError(f"{name}: {', '.join(given)} only apply to csv:/tsv:/jsonl:/parquet: files")
        raw = entry.loader(SourceRequest(name, resolve_data_dir(data_dir)))
    return _build(name, raw, wanted, strict=strict, validation_fraction=validation_fraction, seed=seed)


def _check_splits(splits: Sequence[str] | None) -> tuple[str, ...] | None:
    if splits is None:
        return None
    if isinstance(splits, str):  # "train" would otherwise iterate as t, r, a, i, n
        splits = [splits]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise DatasetError(f"unknown split(s) {names}: choose from {', '.join(SPLITS)}")
    return tuple(s for s in SPLITS if s in splits)


def _build(
    name: str,
    raw: RawDataset,
    wanted: tuple[str, ...] | None,
    *,
    strict: bool,
    validation_fraction: float | None,
    seed: int,
) -> Dataset:
    for split in wanted or ():
        if split in raw.missing:
            raise DatasetError(f"{name}: split '{split}' needs {raw.missing[split]} (not found)")
    examples, bad_rows = _validate(raw)

    # Carve what has no file of its own, always out of train, test first so validation never eats it.
    if "train" in examples:
        shares = []
        if raw.test_fraction > 0 and "test" not in raw.rows and "test" not in raw.missing:
            shares.append(("test", raw.test_fraction))
        if "validation" not in raw.rows and "validation" not in raw.missing:
            fraction = raw.validation_fraction if validation_fraction is None else validation_fraction
            if not 0 <= fraction < 1 - raw.test_fraction:
                limit = f"0 <= f < {1 - raw.test_fraction:g}"
                raise DatasetError(f"{name}: validation_fraction {fraction} is out of range: use {limit}")
            shares.append(("validation", fraction))
        examples.update(_carve(examples["train"], shares, seed))

    splits = {s: examples[s] for s in SPLITS if s in examples and (wanted is None or s in wanted)}
    if strict and bad_rows:
        raise DatasetError(_bad_row_summary(name, bad_rows))
    return Dataset(name, raw.label_names, raw.multilabel_names, splits, tuple(bad_rows), raw.describe())


def _validate(raw: RawDataset) -> tuple[dict[str, list[Example]], list[BadRow]]:
    index = {label: i for i, label in enumerate(raw.label_names)}
    if raw.index_labels:
        # Named datasets may spell a class by its index ("0"/"1", or ints from a Hub parquet).
        index = {str(i): i for i in range(len(raw.label_names))} | index
    binary = {"0": 0, "1": 1}
    examples: dict[str, list[Example]] = {}
    bad: list[BadRow] = []
    seen: set[str] = set()
    for split in SPLITS:
        if split not in raw.rows:
            continue
        kept = examples[split] = []
        for row in raw.rows[split]:
            # An id is claimed by its first row, good or bad, so "duplicate id" never depends on which
            # copy happens to be valid.
            duplicate = row.example_id in seen
            seen.add(row.example_id)
            odd_flag = next((v for v in row.labels if v not in binary), None)  # Jigsaw's six must be 0/1
            if not row.text or not row.text.strip():
                reason = "empty text"
            elif row.label is None or None in row.labels:
                reason = "missing label"
            elif row.label not in index or odd_flag is not None:
                reason = f"unknown label '{row.label if row.label not in index else odd_flag}'"
            elif duplicate:
                reason = "duplicate id"
            else:
                labels = tuple(binary[v] for v in row.labels)
                kept.append(Example(row.example_id, split, row.text, index[row.label], labels))
                continue
            bad.append(BadRow(split, row.example_id, reason))
    return examples, bad


def _carve(pool: list[Example], shares: list[tuple[str, float]], seed: int) -> dict[str, list[Example]]:
    """Split `pool` (the train examples) into train plus one list per share, stratified by label."""
    by_label: dict[int, list[Example]] = {}
    for ex in pool:
        by_label.setdefault(ex.label, []).append(ex)
    moved: dict[str, str] = {}  # example_id -> carved split
    for group in by_label.values():
        group = sorted(group, key=lambda ex: hashlib.sha256(f"{seed}:{ex.example_id}".encode()).hexdigest())
        start = 0
        for split, fraction in shares:
            # Half up, not Python's half-to-even: 10 % of a 5-example class should give 1, not 0.
            take = math.floor(fraction * len(group) + 0.5)
            moved.update((ex.example_id, split) for ex in group[start : start + take])
            start += take
    out: dict[str, list[Example]] = {"train": [ex for ex in pool if ex.example_id not in moved]}
    for split, _ in shares:
        out[split] = [replace(ex, split=split) for ex in pool if moved.get(ex.example_id) == split]
    return out


def _bad_row_summary(name: str, bad_rows: Sequence[BadRow]) -> str:
    counts = ", ".join(f"{n} {reason}" for reason, n in Counter(b.reason for b in bad_rows).most_common())
    first = ", ".join(b.example_id for b in bad_rows[:3])
    return f"{name}: {len(bad_rows)} bad rows ({counts}; first ids: {first}): fix the data or drop --strict"


# ----------------------------------------------------------------------------------------- listing


def list_datasets(data_dir: str | Path | None = None) -> list[DatasetInfo]:
    """Every registry dataset with whether it loads here, from where, and its split sizes; then the
    generic file forms. Never touches the network (a Hub copy counts only if it is already cached)."""
    directory = resolve_data_dir(data_dir)
    infos = []
    for name, entry in REGISTRY.items():
        try:
            raw = entry.loader(SourceRequest(name, directory, allow_network=False))
            ds = _build(name, raw, None, strict=False, validation_fraction=None, seed=0)
        except DatasetError as exc:
            infos.append(DatasetInfo(name, entry.kind, False, str(exc), {}, entry.description))
            continue
        detail = ds.source
        if raw.missing:
            detail += "; " + "; ".join(f"no {s} split ({what} not found)" for s, what in raw.missing.items())
        if ds.bad_rows:
            detail += f"; {len(ds.bad_rows)} bad rows excluded"
        sizes = {s: len(v) for s, v in ds.splits.items()}
        infos.append(DatasetInfo(name, entry.kind, True, detail, sizes, entry.description))
    for kind in GENERIC_KINDS:
        infos.append(
            DatasetInfo(
                f"{kind}:PATH",
                "generic",
                True,
                "your own file: columns text and label (--text-col/--label-col), optional id and split",
                {},
                f"any {kind.upper()} file; label names are its sorted distinct labels; no split column -> "
                "carved 80/10/10",
            )
        )
    return infos
