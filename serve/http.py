"""A small JSON-over-HTTP endpoint for a ProbedModel (standard library only: ``http.server``).

    POST /classify   {"texts": ["...", ...]}  (or {"text": "..."})
                     -> {"results": [{run name: {label, score, scores, threshold}}, ...]}
    POST /generate   {"texts" | "text", "max_new_tokens": 32, "refuse_on": NAME | [NAMES] | {NAME: rule},
                      "refusal": "..."}
                     -> {"results": [{"text", "refused", "refused_by", "probes", ...}, ...]}
    GET  /health     -> {"status": "ok", "probes": {run name: {kind, labels, threshold}}, "model": ...}

Decisions:

- Binds to 127.0.0.1 by default: there is no authentication; put a real gateway in front before exposing it.
- ``ThreadingHTTPServer``: slow clients never block each other's I/O, while the model itself runs one pass at a
  time (the ProbedModel's lock). That serialises requests rather than batching them across clients: simple and
  predictable; batch inside a request with "texts".
- Requests are bounded (body size, texts per request, ``max_new_tokens``) so one request cannot hold the model
  for long. A bad request gets 400 with ``{"error": "..."}``; an unknown path 404; a too-large body 413.
- The server's refusal rules (``probecache serve --refuse-on``) apply to every request: a request's
  ``refuse_on`` can add rules (other probes, or probes the server leaves unguarded) but never lift or loosen the
  server's, since the client is the party a guardrail guards against. ``refusal`` (the text) is the request's to
  choose, defaulting to the server's.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .policy import DEFAULT_REFUSAL, merge
from .probed import ProbedModel

MAX_BODY_BYTES = 1 << 20
MAX_TEXTS = 64
MAX_NEW_TOKENS = 512


class _BadRequest(ValueError):
    pass


def _texts(body: dict) -> list[str]:
    texts = body.get("texts", [body["text"]] if "text" in body else None)
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _BadRequest('pass "texts": a non-empty list of strings (or "text": one string)')
    if len(texts) > MAX_TEXTS:
        raise _BadRequest(f"at most {MAX_TEXTS} texts per request, got {len(texts)}")
    return texts


class ProbeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], probed: ProbedModel, refuse_on=None,
                 refusal: str = DEFAULT_REFUSAL, max_new_tokens: int = 32):
        super().__init__(address, _Handler)
        self.probed, self.refuse_on, self.refusal = probed, refuse_on, refusal
        self.max_new_tokens = max_new_tokens

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict:
        probes = {r.name: {"kind": r.kind, "labels": r.label_names, "threshold": r.threshold} for r in self.probed.runs}
        return {"status": "ok", "probes": probes, "model": self.probed.runs[0].store.get("model"),
                "refuse_on": self.refuse_on}

    def classify(self, body: dict) -> dict:
        return {"results": self.probed.classify(_texts(body))}

    def generate(self, body: dict) -> dict:
        texts = _texts(body)
        n = body.get("max_new_tokens", self.max_new_tokens)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS:
            raise _BadRequest(f'"max_new_tokens" must be an integer in 1..{MAX_NEW_TOKENS}, got {n!r}')
        refusal = body.get("refusal", self.refusal)
        if not isinstance(refusal, str):
            raise _BadRequest('"refusal" must be a string')
        refuse_on = merge(self.refuse_on, body.get("refuse_on"))  # the server's rules always apply
        return {"results": self.probed.generate(texts, max_new_tokens=n, refuse_on=refuse_on, refusal=refusal)}


class _Handler(BaseHTTPRequestHandler):
    server: ProbeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass  # no per-request lines on stderr (prompts may be sensitive; the URL path is all it would show)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.rstrip("/") == "/health":
            self._send(HTTPStatus.OK, self.server.health())
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"unknown path {self.path}: GET /health, POST /classify, "
                                                       f"POST /generate"})

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/classify": self.server.classify, "/generate": self.server.generate}
        route = routes.get(self.path.rstrip("/"))
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"unknown path {self.path}: POST /classify or /generate"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self.close_connection = True  # the body (if any) is not read: the connection cannot be reused
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > MAX_BODY_BYTES else HTTPStatus.BAD_REQUEST
            self._send(status, {"error": f"send a JSON body of 1..{MAX_BODY_BYTES} bytes with a Content-Length"})
            return
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise _BadRequest("the body must be a JSON object")
            self._send(HTTPStatus.OK, route(body))
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._send(HTTPStatus.BAD_REQUEST, {"error": "the body is not valid JSON"})
        except (ValueError, TypeError) as e:  # _BadRequest, and the ProbedModel's own checks (e.g. refuse_on)
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - answer rather than drop the connection; the server keeps running
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})


def make_server(probed: ProbedModel, host: str = "127.0.0.1", port: int = 8000, **options) -> ProbeServer:
    """A bound server (port 0: any free port, see ``server.url``); call ``serve_forever()`` or use ``start``."""
    return ProbeServer((host, port), probed, **options)


def start(server: ProbeServer) -> threading.Thread:
    """Serve in a daemon thread (tests, notebooks); stop with ``server.shutdown(); server.server_close()``."""
    thread = threading.Thread(target=server.serve_forever, name="probecache-serve", daemon=True)
    thread.start()
    return thread
