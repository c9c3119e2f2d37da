"""The corruption matrix: damage a committed store one way at a time and prove that every consumer either
returns the exact original values or fails with one clear line -- never a wrong number with exit 0.

Faults: a flipped byte or a truncation in a ``hidden``, ``mean`` or ``last`` chunk; flipped bits in a
manifest part (spread over the whole file); edited store.json fields; deleted or replaced files. Consumers:
``open_store`` reads (hidden of every example, mean, last), ``probecache train`` (scoring: token stream),
``probecache eval`` of a scoring and a pooling run made on the intact store, and ``store verify``.

Outcomes: ``exact`` (same values / same metrics), ``error`` (a user error: one line, exit 2, or StoreError in
Python), ``silent`` (a different value with exit 0) and ``crash`` (a traceback or another exception type).
Run with ``-s`` to see the table; the counts are the ones reported in docs/RESILIENCE.md.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from probecache.store.verify import verify_store
from typer.testing import CliRunner

from probecache import open_store
from probecache.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

PART_BIT_FLIPS = 24  # random single-bit flips of one manifest part (fixed seed)


# ---- the faults: each edits a copy of the store in place ---------------------------------------------------


def _segment(store: Path, shard: int = 0) -> Path:
    part = store / "manifests" / f"part-{shard:05d}.parquet"
    import pyarrow.parquet as pq

    return store / "segments" / pq.read_table(part, columns=["segment"])["segment"][0].as_py()


def _chunk(store: Path, array: str, shard: int = 0) -> Path:
    files = sorted(p for p in (_segment(store, shard) / array / "c").rglob("*") if p.is_file())
    return files[0]


def _flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_bit(path: Path, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_json(store: Path, edit: Callable[[dict], None]) -> None:
    path = store / "store.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info, indent=1))


def _swap_labels(info: dict) -> None:
    info["dataset"]["label_names"] = info["dataset"]["label_names"][::-1]


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(info: dict) -> None:
        target = info
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value

    return edit


def _faults(store_template: Path) -> dict[str, Callable[[Path], None]]:
    faults: dict[str, Callable[[Path], None]] = {}
    last = len(list((store_template / "manifests").glob("part-*.parquet"))) - 1  # holds validation and test
    for shard in (0, last):
        for array in ("hidden", "mean", "last"):
            faults[f"{array} chunk of shard {shard}: flipped byte"] = lambda s, a=array, n=shard: _flip_byte(
                _chunk(s, a, n))
            faults[f"{array} chunk of shard {shard}: truncated"] = lambda s, a=array, n=shard: _truncate(
                _chunk(s, a, n))
    part_bits = (store_template / "manifests" / "part-00000.parquet").stat().st_size * 8
    for bit in sorted(random.Random(0).sample(range(part_bits), PART_BIT_FLIPS)):
        faults[f"part: bit {bit} flipped"] = lambda s, b=bit: _flip_bit(s / "manifests" / "part-00000.parquet", b)
    faults["part: replaced by another shard's part"] = lambda s: shutil.copyfile(
        s / "manifests" / "part-00001.parquet", s / "manifests" / "part-00000.parquet")
    faults["store.json: logical_dtype edited"] = lambda s: _edit_json(s, _set("logical_dtype", "float16"))
    faults["store.json: n_layers edited"] = lambda s: _edit_json(s, _set("model", "n_layers", lambda n: n - 1))
    faults["store.json: hidden_size edited"] = lambda s: _edit_json(s, _set("model", "hidden_size", lambda d: d // 2))
    faults["store.json: label_names swapped"] = lambda s: _edit_json(s, _swap_labels)
    faults["store.json: truncated"] = lambda s: _truncate(s / "store.json")
    faults["deleted: manifests/"] = lambda s: shutil.rmtree(s / "manifests")
    faults["deleted: a committed segment"] = lambda s: shutil.rmtree(_segment(s))
    faults["deleted: hidden/zarr.json"] = lambda s: (_segment(s) / "hidden" / "zarr.json").unlink()
    faults["deleted: mean chunk"] = lambda s: _chunk(s, "mean").unlink()
    return faults


# ---- the consumers: each returns one outcome --------------------------------------------------------------


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    store = open_store(path)
    ids = store.manifest(columns=["example_id"])["example_id"].to_pylist()
    return {"ids": ids, "hidden": [store.hidden(e) for e in ids], "mean": store.mean(ids), "last": store.last(ids),
            "labels": store.manifest(columns=["label"])["label"].to_pylist(), "label_names": store.label_names}


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def _same(a: dict, b: dict) -> bool:
    if a["ids"] != b["ids"] or a["labels"] != b["labels"] or a["label_names"] != b["label_names"]:
        return False
    if len(a["hidden"]) != len(b["hidden"]):
        return False
    return all(_equal(x, y) for x, y in zip(a["hidden"], b["hidden"], strict=True)) and all(
        _equal(a[k], b[k]) for k in ("mean", "last"))


def read_outcome(path: Path, reference: dict) -> str:
    from probecache.store.errors import StoreError

    try:
        got = _read_all(path)
    except StoreError as e:
        return "error" if "\n" not in str(e) else "crash"
    except Exception:
        return "crash"
    return "exact" if _same(got, reference) else "silent"


def cli_outcome(args: list[str], reference: str | None) -> str:
    result = runner.invoke(app, args)
    if result.exit_code == 2:
        err = result.stderr.strip()
        return "error" if err.startswith("error: ") and "\n" not in err else "crash"
    if result.exit_code != 0:
        return "crash"
    return "exact" if reference is None or _metrics_of(result) == reference else "silent"


def _metrics_of(result) -> str:
    """The test/validation metrics of a train or eval command's output, as canonical JSON."""
    out = result.stdout.strip()
    if out.splitlines()[-1].startswith("run: "):
        run = Path(out.splitlines()[-1].removeprefix("run: "))
        return json.dumps(json.loads((run / "metrics.json").read_text()), sort_keys=True)
    return json.dumps(json.loads(out), sort_keys=True)


def verify_outcome(path: Path, read: str) -> str:
    try:
        report = verify_store(path)
    except Exception as e:
        from probecache.store.errors import StoreError

        return "error" if isinstance(e, StoreError) else "crash"
    if not report.ok:
        return "error"
    return "exact" if read == "exact" else "silent"


# ---- the matrix -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def intact(tiny_model, sentiment_csv, extract_tiny_store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corruption")
    store = extract_tiny_store(tiny_model, folder / "stores", sentiment_csv).path
    runs = folder / "runs"
    train_args = ["--probe", "scoring", "--epochs", "1", "--lr", "0.03", "--no-progress", "--runs-dir", str(runs)]
    first = runner.invoke(app, ["train", "--store", str(store), *train_args])
    assert first.exit_code == 0, first.output
    pooling = runner.invoke(app, ["train", "--store", str(store), "--probe", "pooling", "--epochs", "1",
                                  "--no-progress", "--runs-dir", str(runs)])
    assert pooling.exit_code == 0, pooling.output
    runs_made = {"scoring": Path(first.stdout.strip().splitlines()[-1].removeprefix("run: ")),
                 "pooling": Path(pooling.stdout.strip().splitlines()[-1].removeprefix("run: "))}
    evals = {}
    for name, run in runs_made.items():
        result = runner.invoke(app, ["eval", "--run", str(run), "--store", str(store), "--split", "test", "--json"])
        assert result.exit_code == 0, result.output
        evals[name] = _metrics_of(result)
    return {"store": store, "folder": folder, "train_args": train_args, "train": _metrics_of(first),
            "runs": runs_made, "evals": evals, "values": _read_all(store)}


def test_no_fault_gives_a_silent_wrong_value_or_a_traceback(intact, capsys):
    table: list[tuple[str, dict[str, str]]] = []
    for n, (name, fault) in enumerate(_faults(intact["store"]).items()):
        damaged = intact["folder"] / f"damaged-{n}" / intact["store"].name
        shutil.copytree(intact["store"], damaged)
        fault(damaged)
        row = {"read": read_outcome(damaged, intact["values"])}
        row["verify"] = verify_outcome(damaged, row["read"])
        row["train"] = cli_outcome(["train", "--store", str(damaged), *intact["train_args"][:-1],
                                    str(intact["folder"] / f"runs-{n}")], intact["train"])
        for probe, run in intact["runs"].items():
            row[f"eval {probe}"] = cli_outcome(["eval", "--run", str(run), "--store", str(damaged), "--split", "test",
                                                "--json"], intact["evals"][probe])
        table.append((name, row))
        shutil.rmtree(damaged.parent)
    counts = Counter(outcome for _, row in table for outcome in row.values())
    with capsys.disabled():
        print(f"\ncorruption matrix: {len(table)} faults x {len(table[0][1])} consumers = {sum(counts.values())} "
              f"cases: {dict(sorted(counts.items()))}")
        for name, row in table:
            if any(v in ("silent", "crash") for v in row.values()):
                print(f"  {name}: {row}")
    bad = [(name, row) for name, row in table if any(v in ("silent", "crash") for v in row.values())]
    assert not bad, bad
