"""The HTTP endpoint under load: latency percentiles, status counts and connection errors at 1, 10 and 50
concurrent clients, on loopback, against a real `probecache serve` process.

    python bench/serve_load.py                          # SmolLM2-135M: a 200-review store, a scoring probe, ~3 min
    python bench/serve_load.py --run runs/<id>          # an existing run (its store's model)
    python bench/serve_load.py --model tiny             # the 3-block test Llama: checks this script in seconds

What it does:

- Without ``--run``: extracts ``--limit`` Rotten Tomatoes reviews with ``--model`` into a temporary folder and
  trains a scoring probe on them (2 epochs: latency does not depend on how good the probe is).
- Starts ``probecache serve --run RUN --port 0`` in a subprocess (its own interpreter: client threads never compete
  with the model for the GIL), with ``--concurrency``, ``--max-queue`` and ``--queue-timeout`` as given.
- For each level of ``--clients``: that many client threads start together (a barrier, so the first requests hit
  the listen backlog at once), and each sends ``--requests-per-client`` POST /classify requests, one review each,
  on a fresh connection per request (many independent clients, the worst case for the backlog). A client that gets
  503 waits its Retry-After (at most ``--max-backoff`` s) before its next request, as a well-behaved client would.
  Every request counts once, whatever its answer: the run is bounded and stops by itself.
- Reports per level: requests, 200s, 503s, other statuses, connection errors (resets, refused, timeouts), p50 and
  p99 latency of the 200s and of all answers, and the wall time; as a Markdown table and ``--json`` if asked.

``--before PATH`` serves from another checkout (PYTHONPATH=PATH for the server only) and passes none of the new
limit options: the "before" rows of docs/SERVING.md. An older commit's tree, importable as ``probecache``:

    mkdir /tmp/old && git archive dc230cd | tar -x -C /tmp/old
    for d in extract store manifests train serve; do ln -s /tmp/old/$d /tmp/old/probecache/$d; done

Loopback only: the server binds 127.0.0.1 and clients connect there.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
TINY = "tiny"
PROMPTS = [  # review-like texts of 4 to 25 words; the run's probe scores each (its label does not matter here)
    "a quiet masterpiece",
    "two hours I will never get back",
    "the cast is excellent, but the plot wanders and the last act drags on far too long",
    "charming and funny from start to finish, with a warm heart under the jokes",
    "a mess with no redeeming features at all: clumsy dialogue, lifeless acting, and a score that never stops",
]


def sh(cmd: list[str], **kwargs) -> str:
    """Run a probecache command; its stdout (stderr passes through on failure)."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return result.stdout


def build_run(work: Path, model: str, limit: int) -> Path:
    """The run folder of a scoring probe trained on a small store of ``model``."""
    cli = [sys.executable, "-m", "probecache"]
    if model == TINY:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_tiny_llama, write_sentiment_csv

        model = str(build_tiny_llama(work / "tiny-llama"))
        data = write_sentiment_csv(work / "reviews.csv", n=120)
        dataset = ["--dataset", f"csv:{data}"]
    else:
        dataset = ["--dataset", "rotten_tomatoes", "--limit", str(limit)]
    out = sh([*cli, "extract", *dataset, "--model", model, "--root", str(work / "stores"), "--no-progress"])
    store = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("store:"))
    out = sh([*cli, "train", "--store", store, "--probe", "scoring", "--epochs", "2", "--runs-dir",
              str(work / "runs"), "--no-progress"])
    return Path(next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("run:")))


def start_server(run: Path, args) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    options = []
    if args.before:
        env["PYTHONPATH"] = args.before
    else:
        options = ["--concurrency", str(args.concurrency), "--max-queue", str(args.queue), "--queue-timeout",
                   str(args.queue_timeout)]
    proc = subprocess.Popen([sys.executable, "-m", "probecache", "serve", "--run", str(run), "--host", HOST,
                             "--port", "0", *options], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env, cwd=args.before or None)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        if line.startswith("serving "):
            url = line.split(" on ", 1)[1].split()[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe drained
            return proc, url
    proc.kill()
    raise SystemExit("the server did not start within 10 minutes")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_request(port: int, text: str, timeout: float) -> tuple[str, float, float]:
    """(outcome, seconds, retry_after): outcome is the status code as text or the connection error's name."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/classify", json.dumps({"text": text}),
                     {"Content-Type": "application/json", "Connection": "close"})
        response = conn.getresponse()
        json.loads(response.read())  # every answer, errors included, must be JSON
        retry = float(response.headers.get("Retry-After") or 0)
        return str(response.status), time.perf_counter() - started, retry
    except (OSError, http.client.HTTPException, ValueError) as e:
        return type(e).__name__, time.perf_counter() - started, 0.0
    finally:
        conn.close()


def level(port: int, clients: int, per_client: int, args) -> dict:
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        for k in range(per_client):
            outcome, seconds, retry = one_request(port, PROMPTS[(i * per_client + k) % len(PROMPTS)], args.timeout)
            with lock:
                outcomes.append((outcome, seconds))
            if outcome == "503":
                time.sleep(min(retry, args.max_backoff))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = sorted(s for o, s in outcomes if o == "200")
    every = sorted(s for _, s in outcomes)
    statuses = {o: sum(1 for x, _ in outcomes if x == o) for o in sorted({o for o, _ in outcomes})}
    errors = {o: n for o, n in statuses.items() if not o.isdigit()}
    return {"clients": clients, "requests": len(outcomes), "ok": statuses.get("200", 0),
            "busy": statuses.get("503", 0),
            "other": sum(n for o, n in statuses.items() if o.isdigit() and o not in ("200", "503")),
            "connection_errors": sum(errors.values()), "errors": errors, "statuses": statuses,
            "p50_ok_ms": pct(ok, 50), "p99_ok_ms": pct(ok, 99), "p50_ms": pct(every, 50), "p99_ms": pct(every, 99),
            "wall_s": round(wall, 1)}


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)


def table(rows: list[dict]) -> str:
    head = ("| clients | requests | 200 | 503 | other | connection errors | p50 / p99 ms (200) | p50 / p99 ms (all) "
            "| wall s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        errors = str(r["connection_errors"]) + (f" ({', '.join(f'{k} {v}' for k, v in r['errors'].items())})"
                                                if r["errors"] else "")
        lines.append(f"| {r['clients']} | {r['requests']} | {r['ok']} | {r['busy']} | {r['other']} | {errors} | "
                     f"{r['p50_ok_ms']} / {r['p99_ok_ms']} | {r['p50_ms']} / {r['p99_ms']} | {r['wall_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="an existing run folder (default: build one from --model)")
    parser.add_argument("--model", default="smollm2-135m", help=f"model of the store built without --run ({TINY}: "
                                                                f"the test Llama)")
    parser.add_argument("--limit", type=int, default=200, help="reviews extracted without --run")
    parser.add_argument("--clients", default="1,10,50", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=0,
                        help="requests per client (default: 40 at 1 client, 10 at 10, 4 at 50)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--queue-timeout", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=2, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--timeout", type=float, default=120.0, help="client socket timeout (s)")
    parser.add_argument("--max-backoff", type=float, default=2.0, help="longest Retry-After wait a client honours")
    parser.add_argument("--before", help="serve from this checkout (PYTHONPATH), with the old defaults")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        if args.run:
            run = Path(args.run)
        else:
            started = time.perf_counter()
            run = build_run(work, args.model, args.limit)
            print(f"built {run.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        proc, url = start_server(run, args)
        port = int(url.rsplit(":", 1)[1])
        try:
            one_request(port, PROMPTS[0], args.timeout)  # warm-up: first-call allocations
            rows = []
            for clients in (int(c) for c in args.clients.split(",")):
                per_client = args.requests_per_client or {1: 40, 10: 10}.get(clients, 4)
                rows.append(level(port, clients, per_client, args))
                print(f"{clients} clients: {rows[-1]}", file=sys.stderr)
        finally:
            stop_server(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    setting = ("before (--before: the stdlib defaults)" if args.before else
               f"concurrency {args.concurrency}, queue {args.queue}, queue timeout {args.queue_timeout:g} s")
    print(f"run {run.name}; server: {setting}; OMP_NUM_THREADS={args.threads}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "setting": setting, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
