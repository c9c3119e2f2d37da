"""The command line as users and the acceptance checks drive it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from probecache.cli import app

runner = CliRunner()


def _extract_args(tiny_model, tiny_csv, tmp_path, *extra):
    return ["extract", "--dataset", f"csv:{tiny_csv}", "--model", str(tiny_model), "--root",
            str(tmp_path / "stores"), "--dtype", "fp32", "--no-progress", *extra]


def test_extract_prints_the_store_as_last_stdout_line_and_info_json(tiny_model, tiny_csv, tmp_path):
    result = runner.invoke(app, _extract_args(tiny_model, tiny_csv, tmp_path, "--limit", "12"))
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("store: ")
    store = last.removeprefix("store: ")
    info = runner.invoke(app, ["store", "info", store, "--json"])
    assert info.exit_code == 0
    summary = json.loads(info.stdout)
    for key in ("store_id", "model", "dataset", "n_examples", "n_tokens", "n_layers", "hidden_size",
                "bytes_stored", "bytes_raw", "shards_total", "shards_committed"):
        assert key in summary, key
    assert summary["n_examples"] == 12 and summary["n_layers"] == 4 and summary["hidden_size"] == 64
    assert summary["shards_committed"] == summary["shards_total"] == 1
    assert 0 < summary["bytes_stored"] < summary["bytes_raw"]
    human = runner.invoke(app, ["store", "info", store])
    assert "12 of 12 planned" in human.stdout
    listing = runner.invoke(app, ["store", "ls", str(tmp_path / "stores"), "--json"])
    assert [s["store_id"] for s in json.loads(listing.stdout)] == [summary["store_id"]]
    again = runner.invoke(app, _extract_args(tiny_model, tiny_csv, tmp_path, "--limit", "12", "--progress"))
    assert "already extracted" in again.output and again.stdout.strip().endswith(store)


def test_unknown_dataset(tmp_path, one_line_error):
    one_line_error(runner.invoke(app, ["extract", "--dataset", "nope", "--root", str(tmp_path)]), "nope")


def test_missing_split_file_names_the_file(tmp_path, one_line_error):
    (tmp_path / "toxicchat").mkdir()
    (tmp_path / "toxicchat" / "toxicchat0124_human_train.csv").write_text(
        "conv_id,user_input,toxicity,jailbreaking\na,hello there,0,0\nb,you idiot,1,0\n")
    result = runner.invoke(app, ["extract", "--dataset", "toxicchat", "--split", "test", "--data-dir",
                                 str(tmp_path), "--root", str(tmp_path / "s")])
    one_line_error(result, "toxicchat0124_human_test.csv")


def test_strict_bad_rows_are_an_error_and_otherwise_reported(tiny_model, tmp_path, one_line_error):
    data = tmp_path / "bad.csv"
    data.write_text("id,text,label\na,fine text,pos\nb,,neg\nc,other text,\na,dup id,pos\nd,good,neg\n")
    common = ["extract", "--dataset", f"csv:{data}", "--model", str(tiny_model), "--root", str(tmp_path / "s"),
              "--dtype", "fp32"]
    one_line_error(runner.invoke(app, [*common, "--strict"]), "bad rows")
    assert not (tmp_path / "s").exists()  # nothing written before the data was validated
    ok = runner.invoke(app, common)
    assert ok.exit_code == 0, ok.output
    assert "excluded 3 bad rows" in ok.stderr and "duplicate id" in ok.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--prompt-format", "xml"], "--prompt-format"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--mantissa-bits", "9"], "--mantissa-bits"),
    (["--dtype", "int4"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--model", "/nonexistent/model"], "neither an existing folder"),
])
def test_bad_options_are_one_line_errors(tiny_model, tiny_csv, tmp_path, args, fragment, one_line_error):
    base = _extract_args(tiny_model, tiny_csv, tmp_path)
    one_line_error(runner.invoke(app, [*base, *args]), fragment)


def test_store_commands_on_non_stores(tmp_path, one_line_error):
    one_line_error(runner.invoke(app, ["store", "info", str(tmp_path)]), "not a probecache store")
    one_line_error(runner.invoke(app, ["store", "ls", str(tmp_path / "missing")]), "does not exist")


def test_datasets_lists_the_registry():
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0, result.output
    for name in ("rotten_tomatoes", "toxigen", "jigsaw", "toxicchat", "sst2", "imdb", "emotion"):
        assert name in result.stdout
    listed = json.loads(runner.invoke(app, ["datasets", "--json"]).stdout)
    rt = next(d for d in listed if d["name"] == "rotten_tomatoes")
    assert rt["available"] and sum(rt["split_sizes"].values()) > 12000


def test_installed_entry_point_and_help():
    exe = os.path.join(os.path.dirname(sys.executable), "probecache")
    out = subprocess.run([exe, "extract", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--prompt-format" in out and "store: <path>" in out
    module = subprocess.run([sys.executable, "-m", "probecache", "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and "extract" in module.stdout
