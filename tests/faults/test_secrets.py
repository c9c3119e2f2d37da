"""A secret typed into a root or store URL never reaches disk or output (issue 15, "root parsing that cannot
leak").

Every command that takes a root or a store location is run with each way a credential can ride in a URL (any
scheme case, one, two or three slashes, `Path`-collapsed, in the query, a forgotten scheme, a secret holding a
'/'), given as an argument and through $PROBECACHE_ROOT. Each must end with one `error:` line and exit code 2,
and afterwards neither the outputs nor any file or file name under the run's working directory, $HOME,
$PROBECACHE_CACHE and $TMPDIR may hold the secret.

The commands run in one fresh process (CliRunner inside it, so ~100 invocations cost one import) whose HOME,
cache, TMPDIR and working directory are the test's temp folders: whatever the CLI derives from them at import
time lands where the test looks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

KEY = "AKIAFAKEKEY0EXAMPLE1"
SECRET = "wJalrXUtnFEMI0SECRET0VALUE"

VARIANTS = [
    f"S3://{KEY}:{SECRET}@bucket/p",  # upper-case scheme
    f"s3:/{KEY}:{SECRET}@bucket/p",  # one slash (what Path("s3://...") collapses to)
    f"s3:///{KEY}:{SECRET}@b/p",  # three slashes
    f"Gs://u:{SECRET}@b/p",
    f"s3://{KEY}:{SECRET}@bucket/p",
    f"s3://bucket/p?secret={SECRET}",  # in the query
    f"memory://{KEY}@name/p",  # user only
    f"{KEY}:{SECRET}@bucket/p",  # the scheme forgotten
    f"S3://{KEY}:zz/{SECRET}@bucket/p",  # AWS secrets may hold '/', which ends the authority early
]

# Runs in the child: the setup extraction, then every case; prints one JSON list (exit code, outputs, the
# exception of a crash) and never the arguments, which hold the secret.
DRIVER = r"""
import json, sys
from typer.testing import CliRunner
from probecache.cli import app

setup, cases = json.loads(sys.stdin.read())
runner = CliRunner()
made = runner.invoke(app, setup)
assert made.exit_code == 0, made.output
store = made.stdout.strip().splitlines()[-1].removeprefix("store: ")
out = []
for args, env in cases:
    r = runner.invoke(app, [a.replace("{store}", store) for a in args], env=env)
    crash = None if r.exception is None or isinstance(r.exception, SystemExit) else type(r.exception).__name__
    out.append({"exit": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "crash": crash})
print(json.dumps(out))
"""


def _cases(extract: list[str]) -> list[tuple[str, list[str], dict | None]]:
    """(label, args, env) for every entry point that takes a root or a store location."""
    cases = []
    train = ["train", "--probe", "linear", "--no-progress", "--store"]
    for n, url in enumerate(VARIANTS):
        env = {"PROBECACHE_ROOT": url}
        cases += [
            (f"{n} extract --root", [*extract, "--root", url], None),
            (f"{n} extract $PROBECACHE_ROOT", extract, env),
            (f"{n} store ls", ["store", "ls", url], None),
            (f"{n} store ls $PROBECACHE_ROOT", ["store", "ls"], env),
            (f"{n} store info", ["store", "info", url], None),
            (f"{n} store verify", ["store", "verify", url], None),
            (f"{n} store gc", ["store", "gc", url, "--older-than", "0"], None),
            (f"{n} store status", ["store", "status", url], None),
            (f"{n} store push", ["store", "push", "{store}", url], None),
            (f"{n} store pull", ["store", "pull", url, "pulled"], None),
            (f"{n} train --store", [*train, url], None),
            (f"{n} train --root", [*train, "some-id", "--root", url], None),
            (f"{n} train $PROBECACHE_ROOT", [*train, "some-id"], env),
            (f"{n} eval --store", ["eval", "--run", "runs/none", "--store", url], None),
        ]
    return cases


def _files_holding(folder: Path, needles: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if any(n in rel for n in needles):
            found.append(f"name: {rel}")
        elif path.is_file() and not path.is_symlink() and any(n.encode() in path.read_bytes() for n in needles):
            found.append(f"content: {rel}")
    return found


def test_secrets_in_root_urls_never_reach_disk_or_output(tiny_model, tiny_csv, tmp_path):
    work, home, cache, tmp = (tmp_path / name for name in ("work", "home", "cache", "tmp"))
    for folder in (work, home, cache, tmp):
        folder.mkdir()
    extract = ["extract", "--dataset", f"csv:{tiny_csv}", "--model", str(tiny_model), "--dtype", "fp32",
               "--limit", "12", "--no-progress"]
    cases = _cases(extract)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PROBECACHE_", "GOOGLE_"))}
    env.update(HOME=str(home), PROBECACHE_CACHE=str(cache), TMPDIR=str(tmp), XDG_CACHE_HOME=str(home / ".cache"))
    payload = json.dumps([extract, [(args, case_env) for _, args, case_env in cases]])
    child = subprocess.run([sys.executable, "-c", DRIVER], input=payload, capture_output=True, text=True, cwd=work,
                           env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    needles = (KEY, SECRET)

    wrong = []
    for (label, _, _), r in zip(cases, results, strict=True):
        err = r["stderr"].strip()
        leaked = [n for n in needles if n in r["stdout"] or n in r["stderr"]]
        if r["exit"] != 2 or r["crash"] or not err.startswith("error: ") or "\n" in err or leaked:
            wrong.append(f"{label}: exit {r['exit']}{' ' + r['crash'] if r['crash'] else ''}, "
                         f"{'SECRET IN OUTPUT, ' if leaked else ''}stderr {err[:160]!r}")
        elif "credentials" not in err or "AWS_ACCESS_KEY_ID" not in err:  # the message names the fix
            wrong.append(f"{label}: the error does not say how to pass credentials: {err[:160]!r}")
    assert not wrong, "\n".join(wrong)
    assert not any(n in child.stderr or n in child.stdout for n in needles)
    assert not _files_holding(tmp_path, needles), _files_holding(tmp_path, needles)
    # the setup store is the only thing the run made: no folder named after a URL
    assert sorted(p.name for p in work.iterdir()) == ["stores"]
