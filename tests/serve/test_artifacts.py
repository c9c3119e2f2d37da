"""Damaged or foreign run artifacts: a probe.safetensors that is a pickle, a torch.save zip, empty or has an absurd
header, and stores whose label names differ from the run's. `probecache classify`, `eval` and `serve` answer each
with one `error:` line and exit code 2, and nothing is ever unpickled."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from probecache.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


class Trap:
    """Unpickling this touches a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_files(marker: Path) -> dict[str, bytes]:
    zipped = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, zipped)
    return {
        "a pickle": pickle.dumps(Trap(marker), protocol=4),
        "a torch.save zip": zipped.getvalue(),
        "empty": b"",
        "a huge header": struct.pack("<Q", 1 << 62) + b'{"__metadata__": {}}',
        "a header longer than the file": struct.pack("<Q", 4096) + b'{"a": 1}',
        "three bytes": b"abc",
    }


def copy_run(run: Path, where: Path, name: str) -> Path:
    target = where / name
    shutil.copytree(run, target)
    return target


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.mark.parametrize("kind", ["scoring", "linear"])
def test_a_probe_file_that_is_not_safetensors_is_one_line(runs32, fp32_store, artifacts, kind, one_line_error):
    marker = artifacts / f"unpickled-{kind}"
    for n, data in enumerate(bad_files(marker).values()):
        run = copy_run(runs32(kind), artifacts, f"{kind}-bad-{n}")
        (run / "probe.safetensors").write_bytes(data)
        commands = [["classify", "--run", str(run), "--text", "great"],
                    ["serve", "--run", str(run), "--port", "0"],
                    ["eval", "--run", str(run), "--store", str(fp32_store.path)]]
        for command in commands:
            one_line_error(runner.invoke(app, command), "probe.safetensors", "not a safetensors file")
    assert not marker.exists(), "a pickle was loaded"


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def swap(names: list) -> None:
    names[:] = names[::-1]


def test_eval_refuses_a_store_with_other_label_names(runs32, fp32_store, artifacts, one_line_error):
    """Run and store disagree on the label order: eval used to report (inverted) metrics with exit 0."""
    run = copy_run(runs32("scoring"), artifacts, "eval-swapped")
    edit_json(run / "config.json", lambda c: swap(c["store"]["label_names"]))
    one_line_error(runner.invoke(app, ["eval", "--run", str(run), "--store", str(fp32_store.path)]),
                   "trained on labels ['pos', 'neg']", "['neg', 'pos']")
    result = runner.invoke(app, ["eval", "--run", str(runs32("scoring")), "--store", str(fp32_store.path)])
    assert result.exit_code == 0, result.output  # the untouched run still evaluates
    store_dir = artifacts / "eval-swapped-store" / fp32_store.path.name  # the store's store.json edited instead
    shutil.copytree(fp32_store.path, store_dir)
    edit_json(store_dir / "store.json", lambda s: swap(s["dataset"]["label_names"]))
    one_line_error(runner.invoke(app, ["eval", "--run", str(runs32("scoring")), "--store", str(store_dir)]),
                   "store.json")


def store_copy_with_run(store, run: Path, where: Path, name: str) -> tuple[Path, Path]:
    """A copy of ``store`` and a copy of ``run`` that records the copy as its store."""
    store_dir = where / f"{name}-store" / store.path.name
    shutil.copytree(store.path, store_dir)
    run = copy_run(run, where, f"{name}-run")
    edit_json(run / "config.json", lambda c: c["store"].update(path=str(store_dir)))
    return store_dir, run


def test_serving_refuses_a_run_whose_store_disagrees_on_label_names(runs32, fp32_store, artifacts, one_line_error):
    store_dir, run = store_copy_with_run(fp32_store, runs32("scoring"), artifacts, "served")
    result = runner.invoke(app, ["classify", "--run", str(run), "--text", "great", "--json"])
    assert result.exit_code == 0, result.output  # the copies agree
    # store.json's names swapped after training: run and store disagree
    edit_json(store_dir / "store.json", lambda s: swap(s["dataset"]["label_names"]))
    for command in (["classify", "--run", str(run), "--text", "great"], ["serve", "--run", str(run), "--port", "0"],
                    ["generate", "--run", str(run), "--text", "great"]):
        one_line_error(runner.invoke(app, command), "names label 0 'pos'", "store.json was edited")
    # ... and before training: the run recorded the swapped names too; the manifests still say otherwise
    edit_json(run / "config.json", lambda c: swap(c["store"]["label_names"]))
    one_line_error(runner.invoke(app, ["classify", "--run", str(run), "--text", "great"]), "store.json was edited")
    # the store restored, the run's own config.json edited
    edit_json(store_dir / "store.json", lambda s: swap(s["dataset"]["label_names"]))
    one_line_error(runner.invoke(app, ["classify", "--run", str(run), "--text", "great"]),
                   "trained on labels ['pos', 'neg']", "retrain the run")
