"""The HTTP endpoint's routes, in one table, and the OpenAPI 3.1 document built from it (``GET /openapi.json``).

``serve/http.py`` routes every request through :data:`ROUTES` (which handler, which methods a path allows) and
answers ``GET /openapi.json`` with :func:`openapi_document`, so a route cannot be served without being documented,
nor documented without being served. The schemas describe what the handlers really accept and answer; the limits
in them (texts per request, characters per text, ``max_new_tokens``, body bytes) are the running server's.
No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    method: str  # "GET" (HEAD is answered alike, without a body) or "POST" (a JSON object body)
    path: str
    handler: str  # ProbeServer method: GET: () -> answer; POST: (body) -> the call that answers it
    summary: str
    response: str  # components.schemas name of the 200 answer
    request: str | None = None  # components.schemas name of the body (POST)


ROUTES = (
    Route("GET", "/health", "health", "Served probes, the model, the refusal rules and the request limits", "Health"),
    Route("GET", "/openapi.json", "openapi", "This document (OpenAPI 3.1)", "OpenAPIDocument"),
    Route("POST", "/classify", "plan_classify", "Score texts with every served probe (one probed forward pass per "
          "batch)", "ClassifyResults", "ClassifyRequest"),
    Route("POST", "/generate", "plan_generate", "Generate continuations; probes score each prompt's prefill and "
          "refusal rules may answer with the refusal text instead", "GenerateResults", "GenerateRequest"),
)

# statuses a POST answers besides 200, as serve/http.py's do_POST and _read_body decide them
POST_ERRORS = {
    400: "the body is missing, not JSON, nested too deep, not an object, or has a bad field (the message says which)",
    411: "a chunked body: send a Content-Length",
    413: "the body, a text (characters) or a prompt (tokens, unless truncation was allowed) is too large",
    500: "a bug: the message names the exception; the server keeps running",
    503: "the model's queue is full or the request waited too long for it: retry after Retry-After seconds",
}


def find(method: str, path: str) -> Route | None:
    """The route serving ``method`` (HEAD as GET) on ``path`` (already stripped of query and trailing slash)."""
    method = "GET" if method == "HEAD" else method
    return next((r for r in ROUTES if r.path == path and r.method == method), None)


def allowed(path: str) -> str | None:
    """The ``Allow`` header of a known path (None: unknown path)."""
    methods = [m for r in ROUTES if r.path == path for m in (("GET", "HEAD") if r.method == "GET" else (r.method,))]
    return ", ".join(methods) or None


def route_list() -> str:
    """``GET /health, ...``: what a 404 answer lists."""
    return ", ".join(f"{r.method} {r.path}" for r in ROUTES)


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _error(description: str, header: str | None = None) -> dict:
    response = {"description": description, "content": _json(_ref("Error"))}
    if header:
        response["headers"] = {header: {"$ref": f"#/components/headers/{header}"}}
    return response


def _operation(route: Route, head: bool = False) -> dict:
    answer = {"description": "OK" if not head else "OK (headers only)"}
    if not head:
        answer["content"] = _json(_ref(route.response))
    op = {"operationId": ("head" if head else route.method.lower()) + route.path.replace("/", "_").replace(".", "_"),
          "summary": route.summary, "responses": {"200": answer}}
    if route.request:
        op["requestBody"] = {"required": True, "content": _json(_ref(route.request))}
        op["responses"].update({str(code): _error(text, "Retry-After" if code == 503 else None)
                                for code, text in POST_ERRORS.items()})
    return op


def _schemas(limits: dict) -> dict:
    text = {"type": "string", "maxLength": limits["max_chars"],
            "description": f"a prompt; longer than {limits['max_chars']} characters: 413"}
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": limits["max_texts"]}
    truncate = {"type": "boolean", "default": limits["truncate"],
                "description": "score a prompt longer than a probe reads (its store's max_tokens) by the part it "
                               "was trained to read, instead of refusing it with 413"}
    one_of_texts = [{"required": ["texts"]}, {"required": ["text"]}]  # "texts" wins when both are given
    probe_result = {
        "type": "object", "required": ["label", "scores", "threshold", "truncated"],
        "properties": {
            "label": {"type": "string"},
            "score": {"type": "number", "description": "binary probes only: P(second label)"},
            "scores": {"type": "object", "additionalProperties": {"type": "number"}},
            "threshold": {"type": ["number", "null"], "description": "binary: the decision threshold; else null"},
            "truncated": {"type": "boolean", "description": "the probe read only part of the prompt"},
        },
    }
    rule = {"description": "null or true: the positive class at the tuned threshold; a number: a threshold on "
                           "P(second label); a label or labels that refuse",
            "anyOf": [{"type": "null"}, {"const": True}, {"type": "number", "minimum": 0, "maximum": 1},
                      {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "ProbeResult": probe_result,
        "ProbeResults": {"type": "object", "description": "run name -> its result",
                         "additionalProperties": _ref("ProbeResult")},
        "ClassifyRequest": {"type": "object", "anyOf": one_of_texts,
                            "properties": {"texts": texts, "text": text, "truncate": truncate}},
        "ClassifyResults": {"type": "object", "required": ["results"], "properties": {
            "results": {"type": "array", "items": _ref("ProbeResults"), "description": "one per text, in order"}}},
        "GenerateRequest": {"type": "object", "anyOf": one_of_texts, "properties": {
            "texts": texts, "text": text, "truncate": {**truncate, "description": truncate["description"] + "; "
                                                       "refused (400) when the server guards with --refuse-on "
                                                       "and was not started with --truncate"},
            "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": limits["max_new_tokens"]},
            "refusal": {"type": "string", "description": "the text answered for a refused prompt"},
            "refuse_on": {"description": "refusal rules added to the server's (which always apply)", "anyOf": [
                {"type": "string"}, {"type": "array", "items": {"type": "string"}},
                {"type": "object", "additionalProperties": rule}]},
        }},
        "GenerateResult": {"type": "object", "required": ["text", "refused", "refused_by", "probes", "prompt_tokens",
                                                          "new_tokens", "truncated"], "properties": {
            "text": {"type": "string"}, "refused": {"type": "boolean"},
            "refused_by": {"type": "array", "items": {"type": "string"}},
            "probes": _ref("ProbeResults"), "prompt_tokens": {"type": "integer", "minimum": 0},
            "new_tokens": {"type": "integer", "minimum": 0}, "truncated": {"type": "boolean"}}},
        "GenerateResults": {"type": "object", "required": ["results"], "properties": {
            "results": {"type": "array", "items": _ref("GenerateResult")}}},
        "Health": {"type": "object", "required": ["status", "probes", "model", "refuse_on", "limits"], "properties": {
            "status": {"const": "ok"},
            "probes": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["kind", "labels", "threshold", "max_tokens"], "properties": {
                    "kind": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
                    "threshold": {"type": ["number", "null"]}, "max_tokens": {"type": ["integer", "null"]}}}},
            "model": {"type": ["string", "null"]},
            "refuse_on": {"description": "the server's refusal rules (--refuse-on), as given"},
            "limits": {"type": "object", "additionalProperties": {"type": ["number", "boolean", "null"]}},
        }},
        "OpenAPIDocument": {"type": "object", "required": ["openapi", "info", "paths"]},
    }


def openapi_document(limits: dict, version: str = "0") -> dict:
    """The OpenAPI 3.1 document of a server with these ``limits`` (ProbeServer.health()["limits"])."""
    paths: dict[str, dict] = {}
    for route in ROUTES:
        ops = paths.setdefault(route.path, {})
        ops[route.method.lower()] = _operation(route)
        if route.method == "GET":
            ops["head"] = _operation(route, head=True)
    return {
        "openapi": "3.1.0",
        "info": {"title": "probecache serve", "version": version, "description": (
            "Trained probes scored inside the model's own forward pass (docs/SERVING.md). Every answer is JSON, "
            "errors included ({\"error\": ...}). Any path: 404 when unknown; 405 with Allow for a known path asked "
            "with another method; 400 for a malformed request line; 501 for a method HTTP does not define here. "
            f"Bodies: at most {limits['max_body_bytes']} bytes, with a Content-Length.")},
        "paths": paths,
        "components": {
            "schemas": _schemas(limits),
            "headers": {
                "Retry-After": {"description": "seconds until a place in the queue is likely free",
                                "schema": {"type": "integer", "minimum": 1}},
                "Allow": {"description": "the methods a known path serves", "schema": {"type": "string"}},
            },
        },
    }
