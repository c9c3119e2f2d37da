"""File-backed benchmark datasets: the layouts of `../shared/data/*/SOURCES.md` (and Kaggle's original
Jigsaw files) read from a data directory, with a Hugging Face Hub fallback where a public parquet copy
exists.

`data_dir` may be the parent of the dataset folders (`<data_dir>/sst2/...`) or the dataset folder itself.
Like every source, this stops at raw rows; `datasets.py` applies the shared rules.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .dataset_sources import (
    BINARY_SENTIMENT,
    BINARY_TOXICITY,
    EMOTION_LABELS,
    JIGSAW_LABELS,
    SPLITS,
    DatasetError,
    RawDataset,
    RawRow,
    SourceRequest,
    _lines,
    label_str,
    read_parquet,
    read_table,
    require_columns,
    text_str,
)

FileReader = Callable[[str, Path, str], list[RawRow]]  # (dataset name, file, split) -> rows


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    patterns: dict[str, str]  # split -> glob of its parquet file(s) inside the repo
    text_col: str
    label_col: str
    id_col: str | None = None
    revision: str | None = None
    note: str = ""


@dataclass(frozen=True)
class FileSource:
    folder: str
    layouts: tuple[dict[str, str], ...]  # split -> file name; the first layout whose train file exists wins
    reader: FileReader
    label_names: tuple[str, ...]
    multilabel_names: tuple[str, ...] = ()
    hub: HubSource | None = None
    hub_missing: str = "it has no Hugging Face Hub fallback"


def _csv_reader(
    text_col: str, label_col: str, id_col: str | None, id_prefix: str | None = None
) -> FileReader:
    def read(name: str, path: Path, split: str) -> list[RawRow]:
        header, records = read_table(path)
        require_columns(name, path, header, [text_col, label_col])
        id_col_here = id_col if id_col in header else None  # e.g. the balanced Jigsaw test file has none
        rows = []
        for i, r in enumerate(records):
            source_id = (r.get(id_col_here) or "").strip() if id_col_here else ""
            if source_id:
                example_id = f"{id_prefix}-{source_id}" if id_prefix else source_id
            else:
                example_id = f"{split}-{i}"
            rows.append(RawRow(example_id, r.get(text_col), label_str(r.get(label_col))))
        return rows

    return read


def _read_jigsaw(name: str, path: Path, split: str) -> list[RawRow]:
    header, records = read_table(path)
    if path.name == "test.csv":
        # Kaggle's original test.csv has no labels: they live in test_labels.csv next to it.
        labels_path = path.with_name("test_labels.csv")
        if not labels_path.is_file():
            raise DatasetError(f"{name}: split '{split}' needs {labels_path} next to {path} (not found)")
        require_columns(name, path, header, ["id", "comment_text"])
        label_header, label_records = read_table(labels_path)
        require_columns(name, labels_path, label_header, ["id", *JIGSAW_LABELS])
        by_id = {r.get("id"): r for r in label_records}
        records = ({**by_id.get(r.get("id"), {}), **r} for r in records)
    else:
        require_columns(name, path, header, ["id", "comment_text", *JIGSAW_LABELS])
    rows = []
    for i, r in enumerate(records):
        six = tuple(label_str(r.get(c)) for c in JIGSAW_LABELS)
        rows.append(RawRow((r.get("id") or "").strip() or f"{split}-{i}", r.get("comment_text"), six[0], six))
    return rows


def _read_sst2(name: str, path: Path, split: str) -> list[RawRow]:
    header, records = read_table(path, delimiter="\t")
    require_columns(name, path, header, ["sentence", "label"])
    rows = [
        RawRow(f"{split}-{i}", r.get("sentence"), label_str(r.get("label"))) for i, r in enumerate(records)
    ]
    if split == "test":
        # The labelled test set is PTB-tokenised; GLUE train/dev spell brackets and slashes plainly.
        rows = [row._replace(text=_unescape_ptb(row.text)) for row in rows]
    return rows


_PTB_ESCAPES = re.compile(r"-lrb-|-rrb-|\\/", re.IGNORECASE)


def _unescape_ptb(text: str | None) -> str | None:
    if text is None:
        return None
    return _PTB_ESCAPES.sub(lambda m: {"-lrb-": "(", "-rrb-": ")", "\\/": "/"}[m.group(0).lower()], text)


def _read_emotion(name: str, path: Path, split: str) -> list[RawRow]:
    rows = []
    for i, line in enumerate(_lines(path)):
        if not line.strip():
            continue
        # Tweets may contain ';' themselves; the label is always after the last one.
        text, sep, label = line.rpartition(";")
        rows.append(RawRow(f"{split}-{i}", text if sep else line, label_str(label) if sep else None))
    return rows


FILE_SOURCES: dict[str, FileSource] = {
    "jigsaw": FileSource(
        "jigsaw_toxic",
        (
            {"train": "train.csv", "test": "test.csv"},  # Kaggle's original download
            {"train": "jigsaw2018_multilabel_train.csv", "test": "jigsaw2018_multilabel_test.csv"},
        ),
        _read_jigsaw,
        BINARY_TOXICITY,
        JIGSAW_LABELS,
        hub_missing="its Hugging Face copy needs a manual Kaggle download",
    ),
    "jigsaw_balanced": FileSource(
        "jigsaw_toxic",
        ({"train": "jigsaw2018_train_head20k_toxic.csv", "test": "jigsaw2018_test_balanced_toxic.csv"},),
        _csv_reader("comment_text", "toxic", "row_index", id_prefix="head"),
        BINARY_TOXICITY,
        hub_missing="its Hugging Face copy needs a manual Kaggle download",
    ),
    "toxicchat": FileSource(
        "toxicchat",
        ({"train": "toxicchat0124_human_train.csv", "test": "toxicchat0124_human_test.csv"},),
        _csv_reader("user_input", "toxicity", "conv_id"),
        BINARY_TOXICITY,
        hub=HubSource(
            "lmsys/toxic-chat",
            {"train": "toxicchat0124/train/*.parquet", "test": "toxicchat0124/test/*.parquet"},
            text_col="user_input",
            label_col="toxicity",
            id_col="conv_id",
            revision="refs/convert/parquet",  # the main branch holds CSVs; the parquet export is here
            note="all rows of config toxicchat0124, not only the human-annotated ones",
        ),
    ),
    "sst2": FileSource(
        "sst2",
        (
            {
                "train": "glue_sst2_train.tsv",
                "validation": "glue_sst2_dev.tsv",
                "test": "sst2_test_labeled.tsv",  # PTB-tokenised: see _read_sst2
            },
        ),
        _read_sst2,
        BINARY_SENTIMENT,
        # GLUE's test labels are hidden (-1), so the Hub copy has no usable test split.
        hub=HubSource(
            "stanfordnlp/sst2",
            {"train": "data/train-*.parquet", "validation": "data/validation-*.parquet"},
            text_col="sentence",
            label_col="label",
            note="GLUE test labels are not public: no test split",
        ),
    ),
    "imdb": FileSource(
        "imdb",
        (
            {"train": "imdb_train.csv", "test": "imdb_test.csv"},  # full exports, preferred
            {"train": "imdb_reduced_train.csv", "test": "imdb_reduced_test.csv"},
        ),
        _csv_reader("text", "label", None),
        BINARY_SENTIMENT,
        hub=HubSource(
            "stanfordnlp/imdb",
            {"train": "plain_text/train-*.parquet", "test": "plain_text/test-*.parquet"},
            text_col="text",
            label_col="label",
        ),
    ),
    "emotion": FileSource(
        "emotion",
        ({"train": "train.txt", "validation": "val.txt", "test": "test.txt"},),
        _read_emotion,
        EMOTION_LABELS,
        hub=HubSource(
            "dair-ai/emotion",
            {s: f"split/{s}-*.parquet" for s in SPLITS},
            text_col="text",
            label_col="label",
        ),
    ),
}


def _dataset_folder(data_dir: Path, spec: FileSource) -> Path:
    """`<data_dir>/<folder>` when it exists, else `data_dir` itself when it holds a layout's train file."""
    nested = data_dir / spec.folder
    if nested.is_dir():
        return nested
    if any((data_dir / layout["train"]).is_file() for layout in spec.layouts):
        return data_dir
    return nested


def load_files(req: SourceRequest) -> RawDataset:
    spec = FILE_SOURCES[req.name]
    folder = _dataset_folder(req.data_dir, spec) if req.data_dir is not None else None
    layout = None
    if folder is not None:
        layout = next((lay for lay in spec.layouts if (folder / lay["train"]).is_file()), None)
    if layout is None:
        return _load_hub(req, spec, folder)

    ds = RawDataset(spec.label_names, {}, "", spec.multilabel_names)
    read_files = []
    for split, file_name in layout.items():
        path = folder / file_name
        if path.is_file():
            ds.rows[split] = spec.reader(req.name, path, split)
            read_files.append(file_name)
        else:
            ds.missing[split] = str(path)
    ds.source = f"{folder}/{{{', '.join(read_files)}}}"
    if "test.csv" in read_files:
        _drop_unlabelled_kaggle_test(ds)
    return ds


def _drop_unlabelled_kaggle_test(ds: RawDataset) -> None:
    # Kaggle scored only part of its test set; -1 marks rows it never labelled. They are not data errors.
    kept = [r for r in ds.rows["test"] if "-1" not in r.labels]
    dropped = len(ds.rows["test"]) - len(kept)
    ds.rows["test"] = kept
    ds.notes.append(f"{dropped} Kaggle test rows labelled -1 (never scored) excluded")


# ----------------------------------------------------------------------------------------- Hugging Face Hub


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; reading it here honours changes made later.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_hub(req: SourceRequest, spec: FileSource, folder: Path | None) -> RawDataset:
    expected = " or ".join(str(Path(folder or spec.folder) / lay["train"]) for lay in spec.layouts)
    where = (
        f"no data found in {req.data_dir} (expected {expected})"
        if folder
        else f"no data directory given (expected {expected} under it)"
    )
    fix = "pass --data-dir or set PROBECACHE_DATA_DIR"
    hub = spec.hub
    if hub is None:
        raise DatasetError(f"{req.name}: {where} and {spec.hub_missing}: {fix}")
    offline = _hub_offline() or not req.allow_network
    try:
        from huggingface_hub import snapshot_download  # lazy: only this fallback needs it
    except ImportError:
        raise DatasetError(f"{req.name}: {where} and huggingface_hub is not installed: {fix}") from None
    try:
        # local_files_only still returns a copy cached by an earlier online run, without any network call.
        root = Path(
            snapshot_download(
                hub.repo_id,
                repo_type="dataset",
                revision=hub.revision,
                allow_patterns=list(hub.patterns.values()),
                local_files_only=offline,
                etag_timeout=10,
            )
        )
    except (TypeError, AttributeError, NameError):
        raise  # a bug on our side, not an unavailable Hub
    except Exception as exc:  # connection, timeout, auth, missing repo, offline mode: all mean "no Hub copy"
        if not req.allow_network and not _hub_offline():
            reason = f"there is no cached Hub copy of {hub.repo_id}"
        elif offline:
            reason = f"HF_HUB_OFFLINE is set and there is no cached copy of {hub.repo_id}"
        else:
            reason = f"the Hugging Face Hub is unreachable ({hub.repo_id}: {type(exc).__name__})"
        raise DatasetError(f"{req.name}: {where} and {reason}: {fix}") from None

    ds = RawDataset(spec.label_names, {}, f"Hugging Face Hub {hub.repo_id} ({root})", spec.multilabel_names)
    if hub.note:
        ds.notes.append(hub.note)
    for split, pattern in hub.patterns.items():
        files = sorted(root.glob(pattern))
        if not files:
            ds.missing[split] = f"{root}/{pattern}"
            continue
        records = [r for path in files for r in read_parquet(path)]
        require_columns(req.name, files[0], records[0] if records else {}, [hub.text_col, hub.label_col])
        ds.rows[split] = [
            RawRow(
                str(r[hub.id_col]) if hub.id_col and r.get(hub.id_col) is not None else f"{split}-{i}",
                text_str(r.get(hub.text_col)),
                label_str(r.get(hub.label_col)),
            )
            for i, r in enumerate(records)
        ]
    if "train" not in ds.rows:
        raise DatasetError(f"{req.name}: the Hub copy of {hub.repo_id} has no train split at {root}: {fix}")
    if "test" not in hub.patterns:
        ds.missing["test"] = str(Path(folder or spec.folder) / spec.layouts[-1]["test"])
    return ds


# ----------------------------------------------------------------------------------------- generic files
