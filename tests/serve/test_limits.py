"""Serving under load and attack: prompts longer than a probe reads are refused unless truncation is asked for,
request bodies are bounded (size, JSON depth, characters per text) with a JSON error for every status, and
overload answers 503 with Retry-After instead of resetting connections.

No wall-clock thresholds: overload is produced deterministically by a stand-in model that blocks until the test
releases it, and the 50-client run against the real model asserts only what every response is."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from probecache.serve.errors import PromptTooLong, ServeError
from probecache.serve.http import MAX_BODY_BYTES, make_server, start
from probecache.serve.limits import MAX_JSON_DEPTH, json_depth
from typer.testing import CliRunner

from probecache.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT = 40  # the max_tokens these tests give the served runs
runner = CliRunner()


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture
def short_limit(probed32, monkeypatch):
    """probed32 as if its stores had been extracted with --max-tokens 40 (right truncation)."""
    monkeypatch.setattr(probed32, "tokenisation", probed32.tokenisation.__class__("raw", "right", LIMIT))
    for run in probed32.runs:
        monkeypatch.setitem(run.store, "max_tokens", LIMIT)
    return probed32


def text_of(probed, n_tokens: int) -> str:
    """A text of exactly ``n_tokens`` tokens (the tiny tokenizer has one token per byte, plus any special ones)."""
    special = probed.encode(["g"], whole=True)[1][0] - 1
    text = ("great " * n_tokens)[: n_tokens - special]
    assert probed.encode([text], whole=True)[1][0] == n_tokens
    return text


# ---- prompts longer than a probe reads ------------------------------------------------------------------------


def test_prompts_longer_than_a_probe_reads_are_refused_by_default(short_limit):
    pm = short_limit
    fits, long = text_of(pm, LIMIT), text_of(pm, LIMIT + 1)
    calls = []
    handle = pm.model.base_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        for call in (lambda: pm.classify([fits, long]), lambda: pm.generate([long], max_new_tokens=1)):
            with pytest.raises(PromptTooLong) as e:
                call()
            message = one_line(e)
            assert f"has {LIMIT + 1} tokens" in message and f"at most {LIMIT}" in message and "truncate" in message
            assert isinstance(e.value, ServeError) and not isinstance(e.value, ValueError) and e.value.limit == LIMIT
        assert calls == []  # refused before the model ran
        ids = pm.encode([long], whole=True)[0]
        with pytest.raises(PromptTooLong):
            pm.score_ids(ids)
        with pytest.raises(PromptTooLong):
            pm.generate_ids(ids, max_new_tokens=1)
    finally:
        handle.remove()
    (row,) = pm.classify([fits])  # exactly max_tokens tokens: read whole
    assert all(not r["truncated"] for r in row.values())
    (row,) = pm.classify([long], truncate=True)  # the opt-in: scored on the first 40 tokens, and says so
    assert all(r["truncated"] for r in row.values())
    assert row["mha"]["score"] == pytest.approx(pm.classify([fits])[0]["mha"]["score"], abs=1e-5)


def test_the_run_that_reads_least_sets_the_limit(short_limit, monkeypatch):
    pm = short_limit
    monkeypatch.setitem(pm.runs[1].store, "max_tokens", 30)  # one run was extracted with --max-tokens 30
    text = text_of(pm, 35)
    with pytest.raises(PromptTooLong, match=f"probe {pm.runs[1].name} reads at most 30"):
        pm.classify([text])
    (row,) = pm.classify([text], truncate=True)
    assert [row[name]["truncated"] for name in pm.names] == [name == pm.runs[1].name for name in pm.names]
    (out,) = pm.generate([text], max_new_tokens=1, truncate=True)
    assert out["truncated"] and out["probes"][pm.runs[1].name]["truncated"] and not out["probes"]["mha"]["truncated"]


def test_left_truncation_opt_in_scores_the_last_tokens(short_limit, monkeypatch):
    pm = short_limit
    text = "acting: awful awful " + text_of(pm, LIMIT)
    whole = pm.encode([text], whole=True)[0][0]  # right truncation, whole: every token
    assert len(whole) > LIMIT
    monkeypatch.setattr(pm, "tokenisation", pm.tokenisation.__class__("raw", "left", LIMIT))
    with pytest.raises(PromptTooLong, match="only the last 40"):
        pm.classify([text])
    got = pm.classify([text], truncate=True)[0]
    want = pm.score_ids([whole[-LIMIT:]])
    for name in pm.names:
        assert got[name]["score"] == pytest.approx(float(want[name][0]), abs=1e-5)


# ---- HTTP: bounded requests, JSON errors ----------------------------------------------------------------------


def request(url: str, payload=None, raw: bytes | None = None, method: str = "POST", headers=None):
    """(status, headers, JSON body) of one request; HTTP errors are answers, not exceptions."""
    data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


@pytest.fixture
def serve():
    """``serve(probed, **options) -> server`` on a free loopback port, shut down after the test."""
    servers = []

    def make(probed, **options):
        server = make_server(probed, "127.0.0.1", 0, **options)
        start(server)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def test_http_refuses_prompts_a_probe_cannot_read(short_limit, serve):
    long = text_of(short_limit, LIMIT + 5)
    guarded, open_ = serve(short_limit, refuse_on={"pooling": None}), serve(short_limit)
    for server in (guarded, open_):
        for path in ("/classify", "/generate"):
            status, _, body = request(server.url + path, {"text": long, "max_new_tokens": 1})
            assert status == 413 and f"at most {LIMIT}" in body["error"], body
    status, _, body = request(guarded.url + "/classify", {"text": long, "truncate": True})
    assert status == 200 and body["results"][0]["mha"]["truncated"]
    # a client may not opt out of what the server's guardrail reads; where nothing guards, it may
    status, _, body = request(guarded.url + "/generate", {"text": long, "max_new_tokens": 1, "truncate": True})
    assert status == 400 and "--truncate" in body["error"]
    status, _, body = request(open_.url + "/generate", {"text": long, "max_new_tokens": 1, "truncate": True})
    assert status == 200 and body["results"][0]["truncated"]
    status, _, body = request(open_.url + "/classify", {"text": long, "truncate": "yes"})
    assert status == 400 and '"truncate"' in body["error"]
    server = serve(short_limit, refuse_on={"pooling": None}, truncate=True)  # the operator's explicit choice
    status, _, body = request(server.url + "/generate", {"text": long, "max_new_tokens": 1})
    assert status == 200 and body["results"][0]["truncated"]
    assert request(server.url + "/health", method="GET")[2]["limits"]["max_tokens"] == LIMIT


def test_http_bounds_body_size_depth_and_characters(probed32, serve):
    server = serve(probed32)
    # a body over the limit is read and dropped, so the client (still sending) reads a JSON 413, not a reset
    status, _, body = request(server.url + "/classify", raw=b" " * (8 * MAX_BODY_BYTES))
    assert status == 413 and str(MAX_BODY_BYTES) in body["error"]
    deep = b'{"texts": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"  # what used to answer 500 (RecursionError)
    status, _, body = request(server.url + "/classify", raw=deep)
    assert status == 400 and "200001 levels deep" in body["error"]
    nested = json.dumps({"texts": ["ok"], "x": json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)})
    status, _, body = request(server.url + "/classify", raw=nested.encode())
    assert status == 400 and "levels deep" in body["error"]
    status, _, body = request(server.url + "/classify", {"texts": ["[[[[ {{{{ \" ]]"], "refuse_on": {"a": [1]}})
    assert status == 200  # brackets inside strings do not count
    server = serve(probed32, max_chars=100)
    status, _, body = request(server.url + "/classify", {"texts": ["ok", "x" * 101]})
    assert status == 413 and "text 1 has 101 characters" in body["error"] and "--max-chars" in body["error"]


def test_json_depth_skips_strings_and_is_linear():
    assert [json_depth(s) for s in (b"1", b"{}", b'{"a": [[1], {"b": "[[["}]}', b'"\\"[["', b"")] == [0, 1, 3, 0, 0]
    hostile = b'"' + b'\\"' * 300_000  # an unterminated string of escaped quotes: one match, no rescans
    assert json_depth(hostile) == 0
    assert json_depth("[" * 100_000) == 100_000


def raw_exchange(server, data: bytes) -> tuple[int, dict]:
    """Send raw bytes, read one response: (status, JSON body)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_every_error_status_has_a_json_body(probed32, serve):
    server = serve(probed32)
    cases = [
        (b"PUT /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405),
        (b"BREW /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 501),  # body unread: lingers
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /classify HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # no Content-Length
        (b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
        (b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 404),
        (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{nope", 400),
        (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\nExpect: 100-continue\r\n\r\n", 413),
    ]
    for data, want in cases:
        status, body = raw_exchange(server, data)
        assert status == want and isinstance(body["error"], str) and body["error"], (data[:40], status, body)


def test_methods_and_query_strings(probed32, serve):
    """A known path with another method is 405 naming what is allowed; routing ignores query strings."""
    server = serve(probed32)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for method, path, allow in (("GET", "/classify", "POST"), ("DELETE", "/generate", "POST"),
                                ("POST", "/health", "GET, HEAD")):
        status, headers, body = request(url + path, payload={} if method == "POST" else None, method=method)
        assert status == 405 and headers["Allow"] == allow and method in body["error"], (method, path, body)
    status, _, body = request(url + "/health?verbose=1", method="GET")
    assert status == 200 and body["status"] == "ok"
    status, _, body = request(url + "/classify/?trace=1", payload={"text": "good film"})
    assert status == 200 and len(body["results"]) == 1
    status, _, body = request(url + "/nowhere?x=1", method="GET")
    assert status == 404 and "unknown path /nowhere" in body["error"]


# ---- load: a bounded queue, 503 with Retry-After, never a reset ------------------------------------------------


class GatedModel:
    """Stands in for a ProbedModel whose passes take as long as the test wants: classify blocks until ``gate``."""

    def __init__(self, probed):
        self.runs, self.read_limit = probed.runs, probed.read_limit
        self.gate, self.entered = threading.Event(), threading.Event()
        self.calls = 0

    def classify(self, texts, truncate=False):
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(300), "the test never opened the gate"
        return [{"stub": {"label": "pos"}} for _ in texts]


def clients(url: str, n: int, body: dict, progress: threading.Condition | None = None) -> list:
    """``n`` clients that connect at the same moment and POST /classify once each: per client (status, headers,
    JSON body) or the exception it got (a reset, a refused connection)."""
    results: list = [None] * n
    start_line = threading.Barrier(n)
    host, port = url.removeprefix("http://").split(":")

    def one(i: int) -> None:
        try:
            start_line.wait(60)
            conn = http.client.HTTPConnection(host, int(port), timeout=300)
            conn.request("POST", "/classify", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            results[i] = (response.status, dict(response.headers), json.loads(response.read()))
            conn.close()
        except Exception as e:  # noqa: BLE001 - what the test counts
            results[i] = e
        if progress is not None:
            with progress:
                progress.notify_all()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return results, threads


def test_overload_answers_503_with_retry_after_never_a_reset(probed32, serve):
    """50 clients at once, one in the model, two waiting: exactly 3 answers 200 and 47 a JSON 503."""
    model = GatedModel(probed32)
    server = serve(model, concurrency=1, queue=2, queue_timeout=300)
    progress = threading.Condition()
    results, threads = clients(server.url, 50, {"text": "hi"}, progress)
    with progress:  # the 47 turned away are answered while the model is still busy
        assert progress.wait_for(lambda: sum(r is not None for r in results) >= 47, timeout=300), results
    model.gate.set()
    for t in threads:
        t.join(300)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * 3 + [503] * 47 and model.calls == 3
    for status, headers, body in results:
        if status == 503:
            assert int(headers["Retry-After"]) >= 1 and "--max-queue 2" in body["error"]


def test_a_request_that_waits_too_long_for_the_model_gets_503(probed32, serve):
    model = GatedModel(probed32)
    server = serve(model, concurrency=1, queue=4, queue_timeout=0.05)
    first: list = []
    thread = threading.Thread(target=lambda: first.append(request(server.url + "/classify", {"text": "a"})))
    thread.start()
    assert model.entered.wait(60)  # the first request holds the model until the gate opens
    status, headers, body = request(server.url + "/classify", {"text": "b"})
    assert status == 503 and "--queue-timeout" in body["error"] and int(headers["Retry-After"]) >= 1
    model.gate.set()
    thread.join(60)
    assert first[0][0] == 200 and model.calls == 1


def test_fifty_clients_against_the_real_model(probed32, serve):
    """Every response is a 200 with the right scores or a JSON 503 with Retry-After; no connection errors."""
    server = serve(probed32, concurrency=1, queue=4)
    text = "the film was great great"
    want = probed32.classify([text])[0]["mha"]["score"]
    results, threads = clients(server.url, 50, {"text": text})
    for t in threads:
        t.join(600)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    ok = [r for r in results if r[0] == 200]
    assert ok and all(r[0] in (200, 503) for r in results)
    assert all(r[2]["results"][0]["mha"]["score"] == pytest.approx(want, abs=1e-5) for r in ok)
    assert all(int(r[1]["Retry-After"]) >= 1 and r[2]["error"] for r in results if r[0] == 503)


# ---- the command line -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(runs32, tmp_path_factory) -> Path:
    """A copy of the scoring run whose store is recorded as extracted with --max-tokens 40."""
    import shutil

    run = tmp_path_factory.mktemp("short") / "scoring-40"
    shutil.copytree(runs32("scoring"), run)
    config = json.loads((run / "config.json").read_text())
    config["store"]["max_tokens"] = LIMIT
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_cli_refuses_long_prompts_unless_truncate(short_run, one_line_error):
    long = "great " * 20  # 120 tokens
    for command in ("classify", "generate"):
        one_line_error(runner.invoke(app, [command, "--run", str(short_run), "--text", long]),
                       f"at most {LIMIT}", "--truncate")
        result = runner.invoke(app, [command, "--run", str(short_run), "--text", long, "--truncate", "--json",
                                     *(["--max-new-tokens", "1"] if command == "generate" else [])])
        assert result.exit_code == 0, result.output
        row = json.loads(result.stdout)
        assert row["probes"]["scoring-40"]["truncated"]


def test_cli_refuses_a_deeply_nested_prompt_file(short_run, tmp_path, one_line_error):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    one_line_error(runner.invoke(app, ["classify", "--run", str(short_run), "--file", str(path)]),
                   "line 2", "100000 levels deep")


def test_cli_serve_refuses_bad_limits(short_run, one_line_error):
    one_line_error(runner.invoke(app, ["serve", "--run", str(short_run), "--port", "0", "--concurrency", "0"]),
                   "concurrency")
    one_line_error(runner.invoke(app, ["serve", "--run", str(short_run), "--port", "0", "--max-queue", "-1"]),
                   "queue")
    result = runner.invoke(app, ["serve", "--help"])
    assert all(option in result.stdout for option in ("--truncate", "--max-queue", "--queue-timeout", "--max-chars"))


def test_load_bench_runs_and_stops_by_itself(runs32, tmp_path):
    """bench/serve_load.py end to end on a trained tiny run: a real `probecache serve` process, two levels."""
    import subprocess
    import sys

    out = tmp_path / "load.json"
    bench = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"
    result = subprocess.run([sys.executable, str(bench), "--run", str(runs32("scoring")), "--clients", "1,5",
                             "--requests-per-client", "2", "--threads", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["clients"], r["requests"], r["connection_errors"]) for r in rows] == [(1, 2, 0), (5, 10, 0)]
    assert "| clients | requests |" in result.stdout
