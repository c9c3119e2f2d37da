"""Strict inputs (issue 15, item 6): labels are parsed by type, text must be a string, and a file that
cannot be read is one line naming the file and line, never a traceback and never a silent class.

Every case runs on a tiny file in tmp_path, through `load_dataset` and through `probecache extract`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from probecache.extract.datasets import DatasetError, load_dataset
from typer.testing import CliRunner

from probecache.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_network_no_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PROBECACHE_DATA_DIR", raising=False)


def good_rows(n: int = 10) -> list[tuple[str, str]]:
    return [(f"good text {i}", "pos" if i % 2 else "neg") for i in range(n)]


def write_table(path: Path, rows: list[tuple[str, str]], delimiter: str = ",") -> Path:
    # Written by hand, not with the csv module: the cells are exactly the bytes a user's file holds.
    lines = [f"id{delimiter}text{delimiter}label"]
    lines += [f"r{i}{delimiter}{text}{delimiter}{label}" for i, (text, label) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def good_records(n: int = 10) -> list[dict]:
    return [{"id": f"g{i}", "text": text, "label": label} for i, (text, label) in enumerate(good_rows(n))]


def labels_by_id(ds) -> dict[str, str]:
    return {ex.example_id: ds.label_names[ex.label] for split in ds.splits.values() for ex in split}


# ----------------------------------------------------------------------------------------- missing labels

MISSING_SPELLINGS = ["NaN", "nan", "NAN", "None", "none", "null", "NULL", "", "   "]


@pytest.mark.parametrize("kind", ["csv", "tsv"])
@pytest.mark.parametrize("spelling", MISSING_SPELLINGS)
def test_a_label_spelled_missing_is_a_missing_label_not_a_class(tmp_path, kind, spelling):
    path = write_table(tmp_path / f"d.{kind}", [("odd one", spelling), *good_rows()], "\t" if kind == "tsv" else ",")
    ds = load_dataset(f"{kind}:{path}")
    assert ds.label_names == ("neg", "pos")
    assert [(b.example_id, b.reason) for b in ds.bad_rows] == [("r0", "missing label")]
    assert "r0" not in labels_by_id(ds)
    with pytest.raises(DatasetError, match=r"1 bad rows \(1 missing label; first ids: r0\).*drop --strict"):
        load_dataset(f"{kind}:{path}", strict=True)


def test_a_string_label_spelled_missing_in_jsonl_is_missing_too(tmp_path):
    # CSV has no types, so "NaN" as a JSON string must mean what it means in a CSV cell.
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "text": "odd", "label": "NaN"}, *good_records()])
    ds = load_dataset(f"jsonl:{path}")
    assert ds.label_names == ("neg", "pos") and [b.reason for b in ds.bad_rows] == ["missing label"]


def test_jsonl_null_and_nan_labels_are_missing(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        '{"id": "a", "text": "x", "label": null}',
        '{"id": "b", "text": "y", "label": NaN}',
        '{"id": "c", "text": "z"}',
    ]
    path.write_text("\n".join(lines + [json.dumps(r) for r in good_records()]) + "\n", encoding="utf-8")
    ds = load_dataset(f"jsonl:{path}")
    assert ds.label_names == ("neg", "pos")
    assert [(b.example_id, b.reason) for b in ds.bad_rows] == [(i, "missing label") for i in "abc"]


def test_parquet_null_and_nan_labels_are_missing(tmp_path):
    records = [{"id": "a", "text": "x", "label": None}, {"id": "b", "text": "y", "label": float("nan")}]
    records += [{"id": f"g{i}", "text": f"t{i}", "label": float(i % 2)} for i in range(10)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    ds = load_dataset(f"parquet:{path}")
    assert ds.label_names == ("0", "1")  # floats 0.0/1.0 are the ints 0/1
    assert [(b.example_id, b.reason) for b in ds.bad_rows] == [("a", "missing label"), ("b", "missing label")]


def test_named_dataset_csv_spelling_nan_is_a_missing_label(tmp_path):
    folder = tmp_path / "toxicchat"
    folder.mkdir()
    rows = ["conv_id,user_input,toxicity,jailbreaking", "c0,hello,nan,0"] + [
        f"c{i},p {i},{i % 2},0" for i in range(1, 9)
    ]
    (folder / "toxicchat0124_human_train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ds = load_dataset("toxicchat", data_dir=tmp_path)
    assert [(b.example_id, b.reason) for b in ds.bad_rows] == [("c0", "missing label")]


# ----------------------------------------------------------------------------------------- typed labels

# (JSON label, how the error names its type)
REJECTED_LABELS = [(True, "boolean"), (False, "boolean"), ([1, 2], "list"), ({"x": 1}, "object")]


@pytest.mark.parametrize(("label", "kind"), REJECTED_LABELS)
def test_jsonl_label_of_the_wrong_type_is_an_error_naming_the_rows(tmp_path, label, kind):
    records = [
        *good_records(),
        {"id": "bad1", "text": "a", "label": label},
        {"id": "bad2", "text": "b", "label": label},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DatasetError) as err:
        load_dataset(f"jsonl:{path}")
    message = str(err.value)
    assert f"label column 'label' has {kind} values in 2 rows (bad1, bad2)" in message
    assert message.endswith("write each label as a string or an integer (a boolean as 0/1)")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("column", "kind"),
    [
        (pa.array([True, False] * 5), "boolean"),
        (pa.array([[1], [0]] * 5), "list"),
        (pa.array([{"x": 1}, {"x": 0}] * 5), "object"),
    ],
)
def test_parquet_label_of_the_wrong_type_is_an_error_naming_the_rows(tmp_path, column, kind):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(10)], "label": column}), path)
    with pytest.raises(
        DatasetError, match=rf"label column 'label' has {kind} values in 10 rows \(row-0, row-1, row-2, \.\.\.\)"
    ):
        load_dataset(f"parquet:{path}")


def test_every_wrong_cell_is_named_in_one_line(tmp_path):
    records = [
        {"id": "a", "text": "t", "label": True},
        {"id": "b", "text": ["x"], "label": 1},
        {"id": ["c"], "text": "t", "label": [1]},
        *good_records(),
    ]
    with pytest.raises(DatasetError) as err:
        load_dataset(f"jsonl:{write_jsonl(tmp_path / 'd.jsonl', records)}")
    message = str(err.value)
    assert "label column 'label' has boolean values in 1 row (a)" in message
    assert "text column 'text' has list values in 1 row (b)" in message
    # a rejected id is named by the row's fallback id
    assert "id column 'id' has list values in 1 row (row-2)" in message
    assert "label column 'label' has list values in 1 row (row-2)" in message
    assert "write each id as a string or an integer; write each text as a string; write each label" in message


def test_integer_valued_labels_are_one_class_however_spelled(tmp_path):
    # 1, 1.0, "1", " 1 " and "1.0" are the class "1" (CSV cannot tell them apart, so no format does);
    # other strings stay their own classes and names sort as text once any label is not an integer.
    records = [{"text": f"t{i}", "label": v} for i, v in enumerate([1, 1.0, "1", " 1 ", "1.0", 0, 0.0, "0"])]
    ds = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'a.jsonl', records)}", validation_fraction=0)
    assert ds.label_names == ("0", "1") and ds.bad_rows == ()
    assert sorted(labels_by_id(ds).values()) == ["0"] * 3 + ["1"] * 5
    mixed = [{"text": f"t{i}", "label": v} for i, v in enumerate([2, "yes", 10, "2"])]
    ds = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'b.jsonl', mixed)}", validation_fraction=0)
    assert ds.label_names == ("10", "2", "yes")


def test_csv_float_spelling_of_integer_labels_sorts_numerically(tmp_path):
    # pandas writes an int column that had a gap as "1.0", "10.0": the classes are 1, 2, 10, in that order.
    rows = [(f"t{i}", v) for i, v in enumerate(["1.0", "10.0", "2.0", "1", "2", "10"] * 3)]
    ds = load_dataset(f"csv:{write_table(tmp_path / 'd.csv', rows)}")
    assert ds.label_names == ("1", "2", "10")
    assert labels_by_id(ds)["r0"] == labels_by_id(ds)["r3"] == "1"


def test_non_integer_and_infinite_numbers(tmp_path):
    ok = [{"text": f"t{i}", "label": v} for i, v in enumerate([0.5, "0.5", 1.5])]
    assert load_dataset(f"jsonl:{write_jsonl(tmp_path / 'a.jsonl', ok)}", validation_fraction=0).label_names == (
        "0.5",
        "1.5",
    )
    path = tmp_path / "b.jsonl"
    path.write_text('{"id": "i", "text": "t", "label": Infinity}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"label column 'label' has infinite values in 1 row \(i\)"):
        load_dataset(f"jsonl:{path}")


# ----------------------------------------------------------------------------------------- text must be a string


@pytest.mark.parametrize(
    ("text", "kind"), [(["a", "b"], "list"), ({"a": 1}, "object"), (5, "number"), (2.5, "number"), (True, "boolean")]
)
def test_jsonl_text_that_is_not_a_string_is_an_error_naming_the_rows(tmp_path, text, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "t1", "text": text, "label": 1}, *good_records()])
    with pytest.raises(DatasetError) as err:
        load_dataset(f"jsonl:{path}")
    assert str(err.value).endswith(f"text column 'text' has {kind} values in 1 row (t1): write each text as a string")


def test_parquet_text_that_is_not_a_string_is_an_error(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [["a"], ["b"]], "label": [0, 1]}), path)
    with pytest.raises(DatasetError, match=r"text column 'text' has list values in 2 rows \(row-0, row-1\)"):
        load_dataset(f"parquet:{path}")
    pq.write_table(pa.table({"text": [1, 2], "label": [0, 1]}), path)
    with pytest.raises(DatasetError, match=r"text column 'text' has number values in 2 rows"):
        load_dataset(f"parquet:{path}")


def test_empty_or_null_text_stays_a_bad_row(tmp_path):
    records = [
        {"id": "e", "text": "", "label": 1},
        {"id": "w", "text": " \t", "label": 1},
        {"id": "n", "text": None, "label": 1},
        *good_records(),
    ]
    ds = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'd.jsonl', records)}")
    assert [(b.example_id, b.reason) for b in ds.bad_rows] == [(i, "empty text") for i in "ewn"]


# ----------------------------------------------------------------------------------------- unreadable files


def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{oops\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"d\.jsonl:3 is not valid JSON \(.* at column 2\): fix that line"):
        load_dataset(f"jsonl:{path}")


@pytest.mark.parametrize(
    ("line", "kind"),
    [("[1, 2]", "array"), ('"text"', "string"), ("3", "number"), ("null", "null"), ("true", "boolean")],
)
def test_jsonl_value_that_is_not_an_object_names_file_and_line(tmp_path, line, kind):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"d\.jsonl:2 is a JSON {kind}, not an object: write one"):
        load_dataset(f"jsonl:{path}")


def test_jsonl_nested_too_deeply_is_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"d\.jsonl:2 nests JSON too deeply"):
        load_dataset(f"jsonl:{path}")


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv"])
def test_invalid_utf8_names_file_line_and_column(tmp_path, kind):
    first = {"jsonl": b'{"text": "caf\xc3\xa9", "label": 1}\n', "csv": b"text,label\n", "tsv": b"text\tlabel\n"}[kind]
    bad = {"jsonl": b'{"text": "b\xff", "label": 0}\n', "csv": b"b\xff,0\n", "tsv": b"b\xff\t0\n"}[kind]
    path = tmp_path / f"d.{kind}"
    path.write_bytes(first + b"\n" + bad * 2)  # line 3: the line numbers count the blank line 2 too
    column = 12 if kind == "jsonl" else 2
    with pytest.raises(DatasetError) as err:
        load_dataset(f"{kind}:{path}")
    assert str(err.value) == (
        f"{path}:3: byte 0xff at column {column} is not UTF-8: re-save the {kind.upper()} file as UTF-8"
    )


def test_invalid_utf8_far_into_a_csv_names_the_right_line(tmp_path):
    # Far past the reader's first buffer: a decoder offset would point into the wrong place.
    path = tmp_path / "big.csv"
    path.write_bytes(b"text,label\n" + b"".join(b"row %d \xc3\xa9,1\n" % i for i in range(50_000)) + b"x\xfe,0\n")
    with pytest.raises(DatasetError, match=r"big\.csv:50002: byte 0xfe at column 2 is not UTF-8"):
        load_dataset(f"csv:{path}")


def test_corrupt_bz2_is_one_line(tmp_path):
    path = tmp_path / "d.csv.bz2"
    path.write_bytes(b"this is not bzip2 data")
    with pytest.raises(DatasetError, match=r"cannot read .*d\.csv\.bz2 \(.*\): check that it is a readable CSV file"):
        load_dataset(f"csv:{path}")


# ----------------------------------------------------------------------------------------- through the CLI


def _jsonl(records: list[object]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


_GOOD = _jsonl(good_records())
CLI_CASES = {
    "bool label": (
        "jsonl",
        _GOOD + _jsonl([{"id": "b", "text": "t", "label": True}]),
        "has boolean values in 1 row (b)",
    ),
    "list label": ("jsonl", _GOOD + _jsonl([{"id": "l", "text": "t", "label": [1]}]), "has list values in 1 row (l)"),
    "dict label": ("jsonl", _GOOD + _jsonl([{"id": "d", "text": "t", "label": {}}]), "has object values in 1 row (d)"),
    "list text": ("jsonl", _GOOD + _jsonl([{"id": "x", "text": ["a"], "label": 1}]), "text column 'text' has list"),
    "number text": ("jsonl", _GOOD + _jsonl([{"id": "n", "text": 7, "label": 1}]), "text column 'text' has number"),
    "not json": ("jsonl", _GOOD + b"{oops\n", ".jsonl:11 is not valid JSON"),
    "not an object": ("jsonl", _GOOD + b"[1, 2]\n", ".jsonl:11 is a JSON array"),
    "too deep": ("jsonl", _GOOD + b"[" * 100_000 + b"]" * 100_000 + b"\n", ".jsonl:11 nests JSON too deeply"),
    "binary garbage": ("jsonl", b"\x89PNG\r\n\x1a\n\x00\x00", ".jsonl:1: byte 0x89 at column 1 is not UTF-8"),
    "utf8 jsonl": ("jsonl", _GOOD + b'{"text": "\xff", "label": 1}\n', ".jsonl:11: byte 0xff at column 11"),
    "utf8 csv": ("csv", b"text,label\na,1\n\xc3(,0\n", ".csv:3: byte 0xc3 at column 1 is not UTF-8"),
    "corrupt bz2": ("csv", b"not bzip2", "check that it is a readable CSV file"),
    # missing labels are bad rows: an error only with --strict (without it, see the test below)
    "NaN label, strict": (
        "jsonl",
        _GOOD + b'{"id": "m1", "text": "t", "label": NaN}\n{"id": "m2", "text": "u", "label": "null"}\n',
        "2 bad rows (2 missing label; first ids: m1, m2)",
    ),
    "csv NaN label, strict": (
        "csv",
        b"id,text,label\nq,t,NaN\nr,u,pos\n",
        "1 bad rows (1 missing label; first ids: q)",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, one_line_error, case):
    kind, data, fragment = CLI_CASES[case]
    path = tmp_path / (f"d.{kind}.bz2" if case == "corrupt bz2" else f"d.{kind}")
    path.write_bytes(data)
    strict = ["--strict"] if "strict" in case else []
    result = runner.invoke(app, ["extract", "--dataset", f"{kind}:{path}", "--root", str(tmp_path / "s"), *strict])
    one_line_error(result, fragment)
    assert not (tmp_path / "s").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("column", "fragment"),
    [
        ({"text": ["a", "b"], "label": [True, False]}, "label column 'label' has boolean values in 2 rows"),
        ({"text": [["a"], ["b"]], "label": [0, 1]}, "text column 'text' has list values in 2 rows"),
    ],
)
def test_cli_parquet_of_the_wrong_types_is_one_line_and_exit_2(tmp_path, one_line_error, column, fragment):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(column), path)
    result = runner.invoke(app, ["extract", "--dataset", f"parquet:{path}", "--root", str(tmp_path / "s")])
    one_line_error(result, fragment, "(row-0, row-1)")


def test_cli_missing_label_spellings_are_reported_or_strict(tiny_model, tmp_path, one_line_error):
    rows = [("first", "NaN"), ("second", "None"), ("third", "null"), ("fourth", "")]
    rows += [(f"review number {i}", "pos" if i % 2 else "neg") for i in range(12)]
    path = write_table(tmp_path / "d.csv", rows)
    common = [
        "extract",
        "--dataset",
        f"csv:{path}",
        "--model",
        str(tiny_model),
        "--root",
        str(tmp_path / "s"),
        "--dtype",
        "fp32",
    ]  # progress on: the bad-row report is a progress-log line
    one_line_error(runner.invoke(app, [*common, "--strict"]), "4 bad rows (4 missing label; first ids: r0, r1, r2)")
    ok = runner.invoke(app, common)
    assert ok.exit_code == 0, ok.output
    assert "excluded 4 bad rows: 4 missing label (r0, r1, r2, r3)" in ok.stderr
    store = ok.stdout.strip().splitlines()[-1].removeprefix("store: ")
    info = json.loads(runner.invoke(app, ["store", "info", store, "--json"]).stdout)
    assert info["label_names"] == ["neg", "pos"] and info["n_examples"] == 12
