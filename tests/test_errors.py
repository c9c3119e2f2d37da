"""Which errors the command line shows as the user's: each stage's own types (and the CLI's), as one `error:` line
with exit code 2; anything else, a ValueError from numpy, torch or our own code included, is a bug and keeps its
traceback (exit code 1). `--device` names a device this machine or torch build lacks: one line, for every stage.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from probecache.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the CUDA device asked for")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="module")
def store(tiny_model, folder, sentiment_csv, extract_tiny_store) -> str:
    return str(extract_tiny_store(tiny_model, folder / "stores", sentiment_csv).path)


@pytest.fixture(scope="module")
def linear_run(store, folder) -> str:
    result = runner.invoke(app, ["train", "--store", store, "--probe", "linear", "--layers", "-1", "--runs-dir",
                                 str(folder / "runs"), "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1].removeprefix("run: ")


def test_train_user_errors_are_one_line(store, folder, one_line_error):
    runs = str(folder / "refused")
    train = ["train", "--store", store, "--runs-dir", runs, "--no-progress"]
    one_line_error(runner.invoke(app, [*train, "--probe", "svm"]), "unknown probe 'svm'")  # TrainOptions
    one_line_error(runner.invoke(app, [*train, "--probe", "pooling", "--lr", "0"]), "--lr")  # TrainConfig
    one_line_error(runner.invoke(app, [*train, "--probe", "linear", "--C", "0"]), "--C must be a positive")
    one_line_error(runner.invoke(app, [*train, "--probe", "pooling", "--train-split", "nope"]), "--train-split")
    one_line_error(runner.invoke(app, [*train, "--probe", "pooling", "--seeds", "0"]), "--seeds")  # the CLI's own
    one_line_error(runner.invoke(app, [*train, "--probe", "pooling", "--layers", "99"]), "--layers", "out of range")
    assert not Path(runs).exists() or not any(Path(runs).iterdir())  # no run folder was left behind


def test_eval_and_report_user_errors_are_one_line(store, tmp_path, one_line_error):
    one_line_error(runner.invoke(app, ["eval", "--run", str(tmp_path), "--store", store]),
                   "not a complete probecache run")
    one_line_error(runner.invoke(app, ["report", "--runs-dir", str(tmp_path / "none")]), "no runs under")


def test_serve_and_cli_user_errors_are_one_line(tmp_path, one_line_error):
    one_line_error(runner.invoke(app, ["classify", "--run", str(tmp_path), "--text", "hi"]),
                   "not a complete probecache run")  # ServeError, before any model loads
    one_line_error(runner.invoke(app, ["classify", "--run", str(tmp_path)]), "pass --text")  # CliError
    one_line_error(runner.invoke(app, ["generate", "--run", str(tmp_path), "--text", "hi", "--refuse-on", "=x"]),
                   "--refuse-on")
    latin1 = tmp_path / "prompts.jsonl"
    latin1.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    one_line_error(runner.invoke(app, ["classify", "--run", str(tmp_path), "--file", str(latin1)]), "not UTF-8")


@needs_no_cuda
@pytest.mark.parametrize("device, fragments", [
    ("cuda", ("--device cuda: this torch build has no CUDA", "use --device cpu")),
    ("cuda:3", ("--device cuda:3: this torch build has no CUDA", "use --device cpu")),
    ("mps", ("--device mps: ", "use --device cpu")),
    ("tpu", ("--device 'tpu' is not one of auto, cpu, cuda",)),
])
def test_a_device_this_machine_lacks_is_one_line(store, linear_run, folder, device, fragments, one_line_error):
    runs = folder / f"device-{device.replace(':', '-')}"
    one_line_error(runner.invoke(app, ["train", "--store", store, "--probe", "pooling", "--device", device,
                                       "--runs-dir", str(runs), "--no-progress"]), *fragments)
    assert not runs.exists() or not any(runs.iterdir())
    one_line_error(runner.invoke(app, ["eval", "--run", linear_run, "--store", store, "--device", device]),
                   *fragments)


@needs_no_cuda
def test_a_device_this_machine_lacks_is_one_line_for_serving(linear_run, one_line_error):
    for command, extra in (("classify", ["--text", "hi"]), ("generate", ["--text", "hi"]), ("serve", ["--port", "0"])):
        for device in ("cuda", "cuda:1", "mps"):
            one_line_error(runner.invoke(app, [command, "--run", linear_run, "--device", device, *extra]),
                           f"--device {device}", "--device cpu")


def _internal_bug(*args, **kwargs):
    raise ValueError("an internal bug")


@pytest.mark.parametrize("target, args", [
    ("probecache.train.runner.train_run", ["train", "--probe", "pooling", "--no-progress"]),
    ("probecache.train.runner.evaluate_run", ["eval", "--run", "RUN"]),
    ("probecache.train.report.write_report", ["report"]),
    ("probecache.serve.probed.ProbedModel.from_runs", ["classify", "--run", "RUN", "--text", "hi"]),
])
def test_an_internal_value_error_is_not_dressed_as_a_user_error(store, linear_run, folder, monkeypatch, target,
                                                                args):
    if target.endswith(".from_runs"):
        from probecache.serve.probed import ProbedModel

        monkeypatch.setattr(ProbedModel, "from_runs", classmethod(_internal_bug))
    else:
        monkeypatch.setattr(target, _internal_bug)
    args = [linear_run if a == "RUN" else a for a in args]
    extra = {"train": ["--store", store, "--runs-dir", str(folder / "bug")], "eval": ["--store", store],
             "report": ["--runs-dir", str(folder / "runs")]}.get(args[0], [])
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, ValueError) and str(result.exception) == "an internal bug"
    assert "error:" not in result.stderr


_BUGGY_REPORT = """
import sys
import probecache.train.report as report

def write_report(*args, **kwargs):
    raise ValueError("an internal bug")

report.write_report = write_report
from probecache.cli import app
app(["report", "--runs-dir", sys.argv[1]], prog_name="probecache")
"""


def test_an_internal_bug_prints_its_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-c", _BUGGY_REPORT, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "ValueError: an internal bug" in done.stderr
    assert not any(line.startswith("error:") for line in done.stderr.splitlines())


# except clauses of the CLI that may name ValueError: each wraps one call whose ValueError is its documented answer
# to bad input (a float() of an option's text, store.gc.parse_age)
_NARROW_VALUE_ERRORS = {"parse_refuse_on", "_age"}


def test_the_cli_catches_no_value_error_wholesale():
    found = []
    for path in sorted((REPO / "probecache").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            if function.name in _NARROW_VALUE_ERRORS:
                continue
            for handler in (n for n in ast.walk(function) if isinstance(n, ast.ExceptHandler)):
                if handler.type is not None and "ValueError" in ast.unparse(handler.type):
                    found.append(f"{path.name}:{handler.lineno} in {function.name}")
    assert not found, found
