"""GET /openapi.json: one route table (serve/api.py) drives both routing and the document, the document is valid
OpenAPI 3.1, and the server's real answers match the schemas it documents."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from probecache.serve.api import POST_ERRORS, ROUTES, allowed, find, openapi_document
from probecache.serve.http import MAX_BODY_BYTES, MAX_NEW_TOKENS, MAX_TEXTS, ProbeServer, make_server, start

pytestmark = pytest.mark.usefixtures("one_thread")
LIMITS = {"max_tokens": None, "truncate": False, "max_chars": 100, "max_texts": MAX_TEXTS,
          "max_new_tokens": MAX_NEW_TOKENS, "max_body_bytes": MAX_BODY_BYTES, "concurrency": 1, "queue": 16,
          "queue_timeout": 30.0}
OPERATIONS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def documented(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops if method in OPERATIONS}


def test_the_document_lists_exactly_the_routed_methods_and_paths():
    doc = openapi_document(LIMITS)
    routed = {(r.method, r.path) for r in ROUTES} | {("HEAD", r.path) for r in ROUTES if r.method == "GET"}
    assert documented(doc) == routed
    for method, path in routed:
        assert find(method, path) is not None and method in allowed(path).split(", ")
    assert find("GET", "/classify") is None and allowed("/nowhere") is None
    for route in ROUTES:  # a route whose handler the server lacks would answer 500 on every call
        assert callable(getattr(ProbeServer, route.handler, None)), route


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_document_is_structurally_openapi_3_1():
    """A hand-written check of what the OpenAPI 3.1 spec requires, run whether or not a validator is installed."""
    doc = openapi_document(LIMITS, "1.2.3")
    assert doc["openapi"].startswith("3.1.") and doc["info"]["title"] and doc["info"]["version"] == "1.2.3"
    ids = []
    for path, ops in doc["paths"].items():
        assert path.startswith("/")
        for method, op in ops.items():
            assert method in OPERATIONS, (path, method)
            ids.append(op["operationId"])
            assert op["responses"] and "200" in op["responses"], (path, method)
            for code, response in op["responses"].items():
                assert code.isdigit() and 100 <= int(code) < 600 and response["description"], (path, method, code)
            if method == "post":
                assert op["requestBody"]["content"]["application/json"]["schema"]
                assert {int(c) for c in op["responses"]} == {200, *POST_ERRORS}
                assert "Retry-After" in op["responses"]["503"]["headers"]
            if method == "head":
                assert "content" not in op["responses"]["200"]  # HEAD answers carry no body
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for ref in _refs(doc):  # every reference points inside the document
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
    json.dumps(doc)  # plain JSON
    limits = doc["components"]["schemas"]["ClassifyRequest"]["properties"]["texts"]
    assert limits["maxItems"] == MAX_TEXTS and limits["items"]["maxLength"] == 100  # the server's own limits


def test_the_document_passes_openapi_spec_validator():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(openapi_document(LIMITS))


# ---- against a running server --------------------------------------------------------------------------------


def request(url: str, payload=None, method: str = "POST"):
    """(status, headers, JSON body); HTTP errors are answers."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            body = response.read()
            return response.status, response.headers, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


@pytest.fixture
def server(probed32):
    server = make_server(probed32, "127.0.0.1", 0, max_chars=100)
    start(server)
    yield server
    server.shutdown()
    server.server_close()


def test_the_server_serves_its_document_and_every_documented_operation(server):
    status, headers, doc = request(server.url + "/openapi.json", method="GET")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert doc == json.loads(json.dumps(openapi_document(server.health()["limits"], doc["info"]["version"])))
    assert doc["components"]["schemas"]["ClassifyRequest"]["properties"]["texts"]["items"]["maxLength"] == 100
    bodies = {"/classify": {"text": "good film"}, "/generate": {"text": "good film", "max_new_tokens": 1}}
    for method, path in sorted(documented(doc)):
        status, headers, _ = request(server.url + path, bodies.get(path), method=method)
        assert status == 200, (method, path, status)
    for path, ops in doc["paths"].items():  # a method the document does not list is 405, naming the listed ones
        status, headers, _ = request(server.url + path, method="DELETE")
        assert status == 405 and set(headers["Allow"].split(", ")) == {m.upper() for m in ops}
    assert request(server.url + "/openapi", method="GET")[0] == 404


def test_real_answers_match_the_documented_schemas(server):
    jsonschema = pytest.importorskip("jsonschema")
    doc = request(server.url + "/openapi.json", method="GET")[2]

    def check(name: str, instance) -> None:
        # the document itself is the root, so its "#/components/schemas/..." references resolve
        jsonschema.Draft202012Validator({**doc, "$ref": f"#/components/schemas/{name}"}).validate(instance)

    check("Health", request(server.url + "/health", method="GET")[2])
    check("OpenAPIDocument", doc)
    texts = {"texts": ["good film", "a dull, lifeless mess"]}
    check("ClassifyRequest", texts)
    status, _, body = request(server.url + "/classify", texts)
    assert status == 200
    check("ClassifyResults", body)
    ask = {"texts": ["good film"], "max_new_tokens": 2, "refuse_on": {"pooling": 0.0}, "refusal": "no"}
    check("GenerateRequest", ask)
    status, _, body = request(server.url + "/generate", ask)
    assert status == 200 and body["results"][0]["refused"]  # threshold 0: every prompt is refused
    check("GenerateResults", body)
    for path, payload, want in (("/classify", {"texts": []}, 400), ("/classify", {"text": "x" * 101}, 413),
                                ("/generate", {"text": "a", "max_new_tokens": MAX_NEW_TOKENS + 1}, 400)):
        status, _, body = request(server.url + path, payload)
        assert status == want and str(want) in doc["paths"][path]["post"]["responses"], (path, status)
        check("Error", body)
    # what the request schemas refuse, the server refuses too (schema and handler agree on the bounds)
    for name, bad in (("ClassifyRequest", {"texts": []}), ("ClassifyRequest", {"truncate": False}),
                      ("GenerateRequest", {"text": "a", "max_new_tokens": 0})):
        with pytest.raises(jsonschema.ValidationError):
            check(name, bad)
