"""`probecache --help`, every command's `--help` and `--version` import no heavy stage dependency; the documented
`from probecache import ...` lines import.

Checked through `sys.modules` in a fresh interpreter (this one has long since imported torch), not by timing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "zarr", "transformers", "matplotlib", "pyarrow", "numpy", "scipy", "pandas", "dask")

# In a fresh interpreter: every command path of the app (walked through click, which typer has already loaded),
# each invoked with --help, and --version; after each one, the heavy top-level packages loaded so far.
_PROBE = """
import json, sys
import typer.main
from probecache.cli import app

HEAVY = sys.argv[1:]

def paths(command, prefix=()):
    yield prefix
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from paths(sub, (*prefix, name))

report = {}
for path in [*paths(typer.main.get_command(app)), "version"]:
    args = ["--version"] if path == "version" else [*path, "--help"]
    try:
        app(args, prog_name="probecache")
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
    report[" ".join(args)] = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print("REPORT " + json.dumps(report))
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=False)


def test_help_of_every_command_and_version_import_no_heavy_stage():
    done = _run(_PROBE, *HEAVY)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    commands = {key.removesuffix("--help").strip() for key in report}
    # the walk found every command and sub-command (a registration that fails to happen would hide one)
    for name in ("", "extract", "datasets", "train", "eval", "report", "classify", "generate", "serve", "store",
                 "store info", "store ls", "store status", "store verify", "store gc", "store push", "store pull"):
        assert name in commands, name
    loaded = {args: heavy for args, heavy in report.items() if heavy}
    assert not loaded, f"heavy modules imported (cumulative, in walk order): {loaded}"


def test_version_prints_the_distribution_version():
    done = subprocess.run([sys.executable, "-m", "probecache", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"probecache {version('probecache')}"
    import probecache

    assert probecache.__version__ == version("probecache")


def test_import_probecache_is_light():
    done = _run("import sys, probecache; probecache.__version__; "
                f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _documented_imports() -> list[str]:
    import probecache

    texts = [(REPO / "README.md").read_text(encoding="utf-8"), probecache.__doc__ or ""]
    texts += [p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md"))]
    return sorted({m.group(0).strip() for text in texts
                   for m in re.finditer(r"^\s*from probecache(\.\w+)* import [\w, ]+$", text, re.MULTILINE)})


def test_the_documented_imports_exist():
    lines = _documented_imports()
    assert "from probecache import open_store" in lines
    assert any("run_extract" in line for line in lines)


@pytest.mark.parametrize("line", _documented_imports())
def test_documented_import_works(line):
    done = _run(line)
    assert done.returncode == 0, f"{line!r}: {done.stderr}"


def test_run_extract_is_the_extract_function_and_extract_the_stage():
    from probecache.extract.run import extract

    import probecache
    from probecache import run_extract

    assert run_extract is extract
    assert probecache.extract.__name__ == "probecache.extract"  # the subpackage, whatever was imported first


def test_the_help_vocabularies_match_the_stage():
    from probecache.train.choices import ALL_PROBES, BASELINES, PROBE_KINDS
    from probecache.train.probes import PROBES

    assert tuple(PROBES) == PROBE_KINDS
    assert ALL_PROBES == (*PROBES, *BASELINES)


def test_probecache_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from probecache.cli import app

    missing = str(tmp_path / "nope")
    quiet = CliRunner().invoke(app, ["store", "info", missing])
    assert quiet.exit_code == 2 and "Traceback" not in quiet.output
    monkeypatch.setenv("PROBECACHE_DEBUG", "1")
    loud = CliRunner().invoke(app, ["store", "info", missing])
    assert loud.exit_code == 2 and "Traceback" in loud.stderr and loud.stderr.strip().splitlines()[-1].startswith(
        "error: ")


def test_command_defaults_are_the_stages_own():
    """Defaults are written once, in the config dataclasses; the CLI shows and uses exactly those."""
    import dataclasses

    import typer.main
    from probecache.extract.config import ExtractConfig
    from probecache.extract.launchers import LaunchConfig
    from probecache.train.options import Grid, TrainOptions

    from probecache.cli import app

    commands = typer.main.get_command(app).commands

    def defaults(command: str) -> dict:
        return {p.name: p.default for p in commands[command].params}

    def field_defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    extract = defaults("extract")
    shared = {**field_defaults(ExtractConfig), **field_defaults(LaunchConfig)}
    # --root's default is None: $PROBECACHE_ROOT, else the config's "stores" (default_root())
    compared = {name: (extract[name], value) for name, value in shared.items() if name in extract and name != "root"}
    assert len(compared) >= 30, sorted(compared)  # every option with a field: none forgotten by renaming
    assert {n: v for n, v in compared.items() if v[0] != v[1]} == {}

    train = defaults("train")
    grid = {"pool": "pools", "norm": "norms", "downcast": "downcasts", "weight_decay": "weight_decays",
            "batch_size": "batch_sizes", "class_weight": "class_weights", "epochs": "epochs", "patience": "patience"}
    for option, name in grid.items():
        want = getattr(Grid, name)
        assert train[option] == (list(want) if isinstance(want, tuple) else want), option
    # --runs-dir: $PROBECACHE_RUNS, else "runs"; --class-weight: the grid's list (checked above)
    options = {n: v for n, v in field_defaults(TrainOptions).items() if n in train
               and n not in ("runs_dir", "class_weight")}
    assert len(options) >= 8 and {n: (train[n], v) for n, v in options.items() if train[n] != v} == {}
    assert defaults("eval")["device"] == TrainOptions.device


@pytest.mark.parametrize("given", [None, "jemalloc"])
def test_the_cli_puts_arrow_on_the_system_allocator_unless_told_otherwise(given):
    """Arrow's mimalloc pool kept the buffers a many-part manifest read freed (training RSS grew with the store);
    the CLI picks the system pool before pyarrow loads, and a user's own choice wins."""
    code = ("import os, sys; os.environ.pop('ARROW_DEFAULT_MEMORY_POOL', None)\n"
            "if sys.argv[1] != 'None': os.environ['ARROW_DEFAULT_MEMORY_POOL'] = sys.argv[1]\n"
            "import probecache.cli, pyarrow; print(pyarrow.default_memory_pool().backend_name)")
    done = _run(code, str(given))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("system" if given is None else given)
