"""A small JSON-over-HTTP endpoint for a ProbedModel (standard library only: ``http.server``).

    POST /classify   {"texts": ["...", ...]}  (or {"text": "..."}), "truncate": false
                     -> {"results": [{run name: {label, score, scores, threshold, truncated}}, ...]}
    POST /generate   {"texts" | "text", "max_new_tokens": 32, "refuse_on": NAME | [NAMES] | {NAME: rule},
                      "refusal": "...", "truncate": false}
                     -> {"results": [{"text", "refused", "refused_by", "probes", ...}, ...]}
    GET  /health     -> {"status": "ok", "probes": {run name: {kind, labels, threshold}}, "model": ..., "limits"}
    GET  /openapi.json -> the OpenAPI 3.1 document of all of the above, with this server's limits (serve/api.py)

Decisions:

- Binds to 127.0.0.1 by default: there is no authentication; put a real gateway in front before exposing it.
- Every answer is JSON, errors included (``{"error": "..."}``): 400 bad request (a ``ServeError``), 404 unknown
  path, 411 no Content-Length, 413 too large (body, text, or prompt longer than a probe reads), 500 a bug (any
  other exception: its traceback goes to the server's stderr, not to the client), 405 a known path with another
  method (with ``Allow``), 503 overloaded (with ``Retry-After``). The stdlib's own error pages are replaced by the
  same JSON. Routing looks at the path only: a query string or a trailing slash is ignored.
- A prompt longer than a served probe reads (its store's ``max_tokens``) is refused with 413 unless truncation was
  asked for: a guardrail that reads only a prefix is bypassed by padding the prompt. ``"truncate": true`` opts in
  on /classify; on /generate only when the server has no ``--refuse-on`` rules of its own (or was started with
  ``--truncate``), since the client is the party a guardrail guards against.
- Connections are served by threads (slow clients never block each other's I/O); the model runs at most
  ``concurrency`` requests at once (a ProbedModel runs one pass at a time anyway), and at most ``queue`` more wait
  for it, first come first served. A request that finds the queue full, or waits longer than ``queue_timeout``
  seconds, gets 503 with Retry-After at once, rather than piling up. That serialises requests rather than
  batching them across clients: simple and predictable; batch inside a request with "texts".
- The listen backlog is ``backlog`` (the stdlib's default of 5 reset 7-12 of 50 simultaneous clients), and at most
  ``max_connections`` connections get a thread: beyond that, connections wait in the backlog instead of costing a
  thread each. A client that sends nothing for ``timeout`` seconds is disconnected, so idle keep-alive connections
  do not hold threads forever.
- Requests are bounded before any model work: body size, JSON nesting depth (measured on the raw bytes before
  parsing; Python's parser recurses), texts per request, characters per text, ``max_new_tokens``; so one request
  cannot hold the model for long.
- The server's refusal rules (``probecache serve --refuse-on``) apply to every request: a request's
  ``refuse_on`` can add rules (other probes, or probes the server leaves unguarded) but never lift or loosen the
  server's. ``refusal`` (the text) is the request's to choose, defaulting to the server's.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .api import allowed, find, openapi_document, route_list
from .errors import PromptTooLong, ServeError
from .limits import MAX_JSON_DEPTH, too_deep
from .policy import DEFAULT_REFUSAL, merge

if TYPE_CHECKING:
    from .probed import ProbedModel

MAX_BODY_BYTES = 1 << 20
MAX_TEXTS = 64
MAX_NEW_TOKENS = 512
MAX_CHARS = 65_536  # per text: a 300k-character prompt held a CPU model for 77 s
DRAIN_BYTES = 16 << 20  # an oversized body up to this size is read and dropped, so that the client reads its 413
LINGER_SECONDS = 2.0  # after answering a request whose body was not read: how long to read and drop the rest
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class _BadRequest(ServeError):
    pass


class _TooLarge(_BadRequest):
    pass


class Overloaded(Exception):
    """The model's queue is full, or a request waited too long for it: 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Admission:
    """At most ``concurrency`` requests in the model, at most ``queue`` more waiting (first come, first served),
    none waiting longer than ``timeout`` seconds. ``slot()`` is the context a model call runs in."""

    def __init__(self, concurrency: int = 1, queue: int = 16, timeout: float = 30.0):
        self.concurrency, self.queue, self.timeout = concurrency, queue, timeout
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: deque = deque()
        self._seconds = 1.0  # moving average of one model call: what Retry-After estimates from

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free (1..60)."""
        return max(1, min(60, math.ceil(self._seconds * (len(self._waiting) + 1) / self.concurrency)))

    def _enter(self) -> None:
        with self._cond:
            if self._running < self.concurrency and not self._waiting:
                self._running += 1
                return
            if len(self._waiting) >= self.queue:
                raise Overloaded(f"the model is busy and {len(self._waiting)} requests already wait for it "
                                 f"(--max-queue {self.queue}): retry after the Retry-After seconds", self.retry_after())
            ticket = object()
            self._waiting.append(ticket)
            deadline = time.monotonic() + self.timeout
            try:
                while self._waiting[0] is not ticket or self._running >= self.concurrency:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Overloaded(f"waited {self.timeout:g} s for the model (--queue-timeout): retry after "
                                         f"the Retry-After seconds", self.retry_after())
                    self._cond.wait(left)
                self._running += 1
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may be first now

    def _leave(self, seconds: float) -> None:
        with self._cond:
            self._running -= 1
            self._seconds = 0.8 * self._seconds + 0.2 * seconds
            self._cond.notify_all()

    def slot(self):
        return _Slot(self)


class _Slot:
    def __init__(self, admission: Admission):
        self.admission = admission

    def __enter__(self) -> None:
        self.admission._enter()
        self.started = time.monotonic()

    def __exit__(self, *exc) -> None:
        self.admission._leave(time.monotonic() - self.started)


def _texts(body: dict, max_chars: int) -> list[str]:
    texts = body.get("texts", [body["text"]] if "text" in body else None)
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _BadRequest('pass "texts": a non-empty list of strings (or "text": one string)')
    if len(texts) > MAX_TEXTS:
        raise _BadRequest(f"at most {MAX_TEXTS} texts per request, got {len(texts)}")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise _TooLarge(f"text {i} has {len(text)} characters; this server accepts at most {max_chars} per text "
                            f"(probecache serve --max-chars)")
    return texts


def _positive(name: str, value, minimum: float = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ServeError(f"{name} must be a number >= {minimum:g}, got {value!r}")


class ProbeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], probed: ProbedModel, refuse_on=None,
                 refusal: str = DEFAULT_REFUSAL, max_new_tokens: int = 32, truncate: bool = False,
                 concurrency: int = 1, queue: int = 16, queue_timeout: float = 30.0, max_chars: int = MAX_CHARS,
                 max_connections: int = 256, backlog: int = 1024, timeout: float = 30.0):
        for name, value in (("concurrency", concurrency), ("max_connections", max_connections),
                            ("backlog", backlog), ("max_chars", max_chars)):
            _positive(name, value)
        _positive("queue", queue, 0)
        _positive("queue_timeout", queue_timeout, 0)
        _positive("timeout", timeout, 0.001)
        self.probed, self.refuse_on, self.refusal = probed, refuse_on, refusal
        self.max_new_tokens, self.truncate, self.max_chars = max_new_tokens, truncate, max_chars
        self.admission = Admission(concurrency, queue, queue_timeout)
        self.socket_timeout = timeout
        self.request_queue_size = backlog  # read by server_activate's listen(); the kernel caps it at somaxconn
        self._connections = threading.BoundedSemaphore(max_connections)
        self._closing = threading.Event()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # ---- connections: a bounded number of handler threads --------------------------------------------------

    def process_request(self, request, client_address) -> None:
        # runs in the accept loop: while every handler thread is busy, stop accepting; new connections then wait
        # in the listen backlog (a client sees a slow connect, never a reset)
        while not self._connections.acquire(timeout=0.5):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, _CLIENT_GONE):
            return  # the client hung up or went silent: nothing to answer, nothing to report
        print(f"probecache serve: a connection failed: {type(error).__name__}: {error}", file=sys.stderr)

    # ---- requests -----------------------------------------------------------------------------------------

    def health(self) -> dict:
        probes = {r.name: {"kind": r.kind, "labels": r.label_names, "threshold": r.threshold,
                           "max_tokens": r.max_tokens} for r in self.probed.runs}
        a = self.admission
        limits = {"max_tokens": self.probed.read_limit, "truncate": self.truncate, "max_chars": self.max_chars,
                  "max_texts": MAX_TEXTS, "max_new_tokens": MAX_NEW_TOKENS, "max_body_bytes": MAX_BODY_BYTES,
                  "concurrency": a.concurrency, "queue": a.queue, "queue_timeout": a.timeout}
        return {"status": "ok", "probes": probes, "model": self.probed.runs[0].store.get("model"),
                "refuse_on": self.refuse_on, "limits": limits}

    def openapi(self) -> dict:
        """The OpenAPI 3.1 document of this server (routes from serve/api.py ROUTES, limits from health())."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            release = version("probecache")
        except PackageNotFoundError:  # run from a source tree that was never installed
            release = "0+unknown"
        return openapi_document(self.health()["limits"], release)

    def _truncate(self, body: dict, guarded: bool) -> bool:
        value = body.get("truncate", self.truncate)
        if not isinstance(value, bool):
            raise _BadRequest('"truncate" must be true or false')
        if value and guarded and not self.truncate:
            raise _BadRequest('"truncate" would let the probes guarding this server (--refuse-on) read only part of '
                              'a prompt; only the server can allow that (probecache serve --truncate)')
        return value

    def plan_classify(self, body: dict) -> Callable[[], dict]:
        """Validate a /classify body (no model work); the call that answers it."""
        texts, truncate = _texts(body, self.max_chars), self._truncate(body, guarded=False)
        return lambda: {"results": self.probed.classify(texts, truncate=truncate)}

    def plan_generate(self, body: dict) -> Callable[[], dict]:
        texts = _texts(body, self.max_chars)
        n = body.get("max_new_tokens", self.max_new_tokens)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS:
            raise _BadRequest(f'"max_new_tokens" must be an integer in 1..{MAX_NEW_TOKENS}, got {n!r}')
        refusal = body.get("refusal", self.refusal)
        if not isinstance(refusal, str):
            raise _BadRequest('"refusal" must be a string')
        truncate = self._truncate(body, guarded=bool(self.refuse_on))
        refuse_on = merge(self.refuse_on, body.get("refuse_on"))  # the server's rules always apply
        return lambda: {"results": self.probed.generate(texts, max_new_tokens=n, refuse_on=refuse_on,
                                                        refusal=refusal, truncate=truncate)}


class _Handler(BaseHTTPRequestHandler):
    server: ProbeServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout  # a silent client is dropped rather than holding its thread
        self.unread = False  # a request's body was left unread: close gracefully (see finish)
        super().setup()

    def finish(self) -> None:
        super().finish()
        if self.unread:
            self._linger()

    def _linger(self) -> None:
        """Close a connection whose request body we did not read without resetting it. Closing a socket with
        unread bytes sends a TCP reset, and a reset can destroy our answer before the client reads it; so: stop
        sending (FIN after the answer), then read and drop what the client still sends, for a short while."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline, left = time.monotonic() + LINGER_SECONDS, DRAIN_BYTES
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                chunk = self.connection.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass  # the client is gone or silent: nothing more to protect

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass  # no per-request lines on stderr (prompts may be sensitive; the URL path is all it would show)

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (malformed request line, too many headers, unsupported method) as JSON too."""
        self.close_connection = self.unread = True
        if self.request_version == "HTTP/0.9":  # an unparseable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        self._send(code, {"error": message or HTTPStatus(code).phrase})

    def _route(self) -> str:
        """The request's path without query string, fragment or trailing slash: what routing looks at."""
        return urlsplit(self.path).path.rstrip("/") or "/"

    def _no_such_route(self, path: str) -> None:
        """404 for an unknown path; 405 with ``Allow`` for a known path asked with another method."""
        self._discard_body()
        methods = allowed(path)
        if methods is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"unknown path {path}: {route_list()}"})
        else:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} {path} is not served: use "
                                                                f"{methods} {path}"}, {"Allow": methods})

    def _discard_body(self) -> None:
        length = self._length()
        self._discard(length or 0)
        if length is None or length > DRAIN_BYTES:
            self.close_connection = self.unread = True

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        route = find("GET", self._route())  # the routes of serve/api.py, which /openapi.json documents
        if route is None:
            self._no_such_route(self._route())
        else:
            self._send(HTTPStatus.OK, getattr(self.server, route.handler)())

    do_HEAD = do_GET  # noqa: N815 - the stdlib's name; _send writes no body for HEAD

    def _other_method(self) -> None:
        self._no_such_route(self._route())

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other_method  # noqa: N815

    def _length(self) -> int | None:
        """The body's Content-Length; None when absent or not a number."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _refuse_large(self, length: int) -> None:
        self.close_connection = self.unread = True
        self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"the body has {length} bytes; at most "
                                                                   f"{MAX_BODY_BYTES} are accepted"})

    def handle_expect_100(self) -> bool:
        # a client that asks before sending (curl does above 1 MiB) learns at once that its body is too large
        length = self._length()
        if length is not None and length > MAX_BODY_BYTES:
            self._refuse_large(length)
            return False
        return super().handle_expect_100()

    def _discard(self, length: int) -> None:
        """Read and drop a body we refuse, so that the client (still sending) gets to read our answer instead of
        a reset; past DRAIN_BYTES the connection is just closed."""
        left = length if length <= DRAIN_BYTES else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _read_body(self) -> dict | None:
        """The request's JSON object, or None after answering why not."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = self.unread = True  # the chunked body is not read: no reuse
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "send the body with a Content-Length (no chunked "
                                                             "transfer encoding)"})
            return None
        length = self._length()
        if length is None or length == 0:
            self.close_connection = self.unread = True
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"send a JSON body of 1..{MAX_BODY_BYTES} bytes with a "
                                                         f"Content-Length"})
            return None
        if length > MAX_BODY_BYTES:
            self._discard(length)
            self._refuse_large(length)
            return None
        data = self.rfile.read(length)
        if len(data) < length:  # the client hung up mid-body: no one to answer
            self.close_connection = True
            return None
        reason = too_deep(data, MAX_JSON_DEPTH)  # before json.loads, whose parser recurses
        if reason:
            self._send(HTTPStatus.BAD_REQUEST, {"error": reason})
            return None
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            self._send(HTTPStatus.BAD_REQUEST, {"error": "the body is not valid JSON"})
            return None
        if not isinstance(body, dict):
            self._send(HTTPStatus.BAD_REQUEST, {"error": "the body must be a JSON object"})
            return None
        return body

    def do_POST(self) -> None:  # noqa: N802
        route = find("POST", self._route())
        if route is None:
            self._no_such_route(self._route())
            return
        plan = getattr(self.server, route.handler)
        body = self._read_body()
        if body is None:
            return
        try:
            call = plan(body)  # everything a request can get wrong is refused here, before it queues
            with self.server.admission.slot():
                result = call()
            self._send(HTTPStatus.OK, result)
        except Overloaded as e:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)}, {"Retry-After": str(e.retry_after)})
        except (_TooLarge, PromptTooLong) as e:
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": str(e)})
        except ServeError as e:  # _BadRequest, and the ProbedModel's own checks (e.g. refuse_on)
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except _CLIENT_GONE:
            raise
        except Exception as e:  # noqa: BLE001 - a bug: answer rather than drop the connection; the server keeps running
            # the traceback goes to the operator's stderr, not to the client (it shows the server's internals)
            print(f"probecache serve: internal error answering POST {self._route()}:\n"
                  f"{''.join(traceback.format_exception(e)).rstrip()}", file=sys.stderr)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({type(e).__name__}); the server "
                                                                   "logged its traceback"})


def make_server(probed: ProbedModel, host: str = "127.0.0.1", port: int = 8000, **options) -> ProbeServer:
    """A bound server (port 0: any free port, see ``server.url``); call ``serve_forever()`` or use ``start``.
    ``options``: ProbeServer's (refuse_on, refusal, max_new_tokens, truncate, concurrency, queue, queue_timeout,
    max_chars, max_connections, backlog, timeout)."""
    return ProbeServer((host, port), probed, **options)


def start(server: ProbeServer) -> threading.Thread:
    """Serve in a daemon thread (tests, notebooks); stop with ``server.shutdown(); server.server_close()``."""
    thread = threading.Thread(target=server.serve_forever, name="probecache-serve", daemon=True)
    thread.start()
    return thread
