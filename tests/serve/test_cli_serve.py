"""`probecache classify`, `generate` and `serve` as users drive them (typer's CliRunner), and the HTTP endpoint on
loopback: in a thread (every route and error), and once as the real `probecache serve` process on a free port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from probecache.serve.http import MAX_TEXTS, make_server, start
from typer.testing import CliRunner

from probecache.cli import app

runner = CliRunner()
TEXTS = ["the film was great great", "acting: awful awful"]

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def runs(runs32) -> dict[str, Path]:
    return {"sentiment": runs32("scoring"), "linear": runs32("linear")}


def test_classify_table_and_json(runs, probed32):
    result = invoke("classify", "--run", f"sentiment={runs['sentiment']}", "--run", f"lin={runs['linear']}",
                    "--text", TEXTS[0], "--text", TEXTS[1])
    assert result.exit_code == 0, result.output
    header, rule, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["#", "text", "sentiment", "lin"] and len(rows) == 2
    result = invoke("classify", "--run", f"sentiment={runs['sentiment']}", "--text", TEXTS[0], "--text", TEXTS[1],
                    "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    expected = probed32.classify(TEXTS)
    for i, line in enumerate(lines):
        assert line["index"] == i and line["text"] == TEXTS[i] and list(line["probes"]) == ["sentiment"]
        assert line["probes"]["sentiment"]["score"] == pytest.approx(expected[i]["scoring"]["score"], abs=1e-5)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_classify_reads_files(runs, tmp_path, suffix, one_line_error):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    else:
        path.write_text("id,prompt\n" + "".join(f"{i},{t}\n" for i, t in enumerate(TEXTS)))
    result = invoke("classify", "--run", str(runs["sentiment"]), "--file", str(path), "--text-col", "prompt", "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["text"] for line in result.stdout.strip().splitlines()] == TEXTS
    one_line_error(invoke("classify", "--run", str(runs["sentiment"]), "--file", str(path)),
                   "no text column 'text'", "--text-col")


def test_classify_errors_are_one_line(runs, runs32, tmp_path, one_line_error):
    one_line_error(invoke("classify", "--run", str(runs32("tfidf")), "--text", "x"), "tfidf baseline")
    one_line_error(invoke("classify", "--run", str(runs["sentiment"])), "pass --text")
    one_line_error(invoke("classify", "--run", str(tmp_path), "--text", "x"), "not a complete probecache run")
    one_line_error(invoke("classify", "--run", str(runs["sentiment"]), "--file", str(tmp_path / "a.txt")),
                   "no such file")


def test_generate_shows_text_scores_and_refusals(runs, one_line_error):
    run = f"sentiment={runs['sentiment']}"
    result = invoke("generate", "--run", run, "--text", TEXTS[0], "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert "prompt: the film was great great" in result.stdout and "sentiment: " in result.stdout
    result = invoke("generate", "--run", run, "--text", TEXTS[0], "--refuse-on", "sentiment=0.0",
                    "--refusal", "Not today.", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["refused"] and row["text"] == "Not today." and row["refused_by"] == ["sentiment"]
    one_line_error(invoke("generate", "--run", run, "--text", "x", "--refuse-on", "other"), "not served")
    one_line_error(invoke("generate", "--run", run, "--text", "x", "--refuse-on", "sentiment="), "--refuse-on")


# ---- HTTP ---------------------------------------------------------------------------------------------------


def post(url: str, payload, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(probed32):
    srv = make_server(probed32, "127.0.0.1", 0, refuse_on={"pooling": None}, max_new_tokens=3)
    start(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_http_classify_and_health(server, probed32):
    status, body = post(server.url + "/classify", {"texts": TEXTS})
    assert status == 200 and len(body["results"]) == 2
    expected = probed32.classify(TEXTS)
    for got, want in zip(body["results"], expected, strict=True):
        assert got["mha"]["score"] == pytest.approx(want["mha"]["score"], abs=1e-12)
    status, body = post(server.url + "/classify", {"text": TEXTS[0]})
    assert status == 200 and len(body["results"]) == 1
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and set(health["probes"]) == set(probed32.names)


def test_http_generate_with_server_and_request_policies(server, probed32):
    status, body = post(server.url + "/generate", {"texts": TEXTS, "refuse_on": {"mha": 0.0}, "refusal": "no"})
    assert status == 200 and all(r["refused"] and r["text"] == "no" and "mha" in r["refused_by"]
                                 for r in body["results"])  # a request adds a rule of its own
    for text in TEXTS:  # the server's rule (pooling predicts "pos") applies, whatever the request says
        for extra in ({}, {"refuse_on": None}, {"refuse_on": {"pooling": 1.0}}):
            status, body = post(server.url + "/generate", {"text": text, "max_new_tokens": 2, **extra})
            (row,) = body["results"]
            assert status == 200 and row["refused"] == (row["probes"]["pooling"]["label"] == "pos")
            assert row["refused_by"] == (["pooling"] if row["refused"] else [])
            assert row["refused"] or 0 < row["new_tokens"] <= 2


@pytest.mark.parametrize("path, payload, raw, status, fragment", [
    ("/classify", None, b"{not json", 400, "not valid JSON"),
    ("/classify", [1, 2], None, 400, "JSON object"),
    ("/classify", {"texts": []}, None, 400, "non-empty list"),
    ("/classify", {"texts": ["x"] * (MAX_TEXTS + 1)}, None, 400, "at most"),
    ("/generate", {"text": "x", "max_new_tokens": 10_000}, None, 400, "max_new_tokens"),
    ("/generate", {"text": "x", "refuse_on": {"nope": None}}, None, 400, "not served"),
    ("/nowhere", {"text": "x"}, None, 404, "unknown path"),
])
def test_http_errors(server, path, payload, raw, status, fragment):
    got, body = post(server.url + path, payload, raw)
    assert got == status and fragment in body["error"]


def test_serve_command_on_a_free_port(runs):
    """The real `probecache serve` process: binds port 0, says where, answers, stops on SIGINT."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "probecache", "serve", "--run", f"s={runs['sentiment']}",
                             "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline, url = time.time() + 120, None
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            if line.startswith("serving "):
                url = line.split(" on ", 1)[1].split()[0]
        assert url, f"no 'serving ... on URL' line (exit code {proc.poll()})"
        status, body = post(url + "/classify", {"texts": TEXTS})
        assert status == 200 and set(body["results"][0]) == {"s"}
    finally:
        proc.send_signal(2)  # SIGINT: the command closes its socket and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
