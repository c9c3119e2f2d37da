"""The HTTP endpoint answers the serve stage's own errors (ServeError) with a 4xx JSON error, and anything else, a
ValueError or TypeError of a bug included, with a 500 JSON error whose traceback goes to the server's stderr."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from probecache.serve.errors import ServeError
from probecache.serve.http import make_server, start

pytestmark = pytest.mark.usefixtures("one_thread")


def post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server(probed32):
    server = make_server(probed32, "127.0.0.1", 0)
    start(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("refuse_on, fragment", [
    ({"nope": None}, "not served"),  # parse_rules, inside the model call
    (5, "refuse_on must be"),  # a shape the policy cannot read: was a TypeError, now the request's error
    (["pooling", ["x"]], "refuse_on must be"),
    ({"pooling": False}, "refuse_on['pooling'] must be"),
    ({"pooling": 1.5}, r"probability in [0, 1]"),
])
def test_a_bad_request_is_a_400_json_error(server, refuse_on, fragment):
    status, body = post(f"{server.url}/generate", {"texts": ["hi"], "refuse_on": refuse_on, "max_new_tokens": 1})
    assert status == 400, body
    assert fragment in body["error"]


def test_a_serve_error_from_the_model_call_is_a_400(server, probed32, monkeypatch):
    def refuse(*args, **kwargs):
        raise ServeError("this request cannot be served: change it")

    monkeypatch.setattr(probed32, "classify", refuse)
    status, body = post(f"{server.url}/classify", {"texts": ["hi"]})
    assert (status, body) == (400, {"error": "this request cannot be served: change it"})


@pytest.mark.parametrize("bug", [ValueError, TypeError, KeyError])
def test_an_internal_error_is_a_500_with_its_traceback_logged(server, probed32, monkeypatch, capsys, bug):
    def broken(*args, **kwargs):
        raise bug("secret internal detail")

    monkeypatch.setattr(probed32, "classify", broken)
    status, body = post(f"{server.url}/classify", {"texts": ["hi"]})
    assert status == 500, body
    assert body["error"].startswith(f"internal error ({bug.__name__})")
    assert "secret internal detail" not in body["error"]  # the server's internals stay out of the answer
    logged = capsys.readouterr().err
    assert "Traceback (most recent call last)" in logged and "secret internal detail" in logged
    status, body = post(f"{server.url}/classify", {"texts": ["hi"]})  # the server keeps serving
    assert status == 500


def test_serve_errors_are_not_value_errors():
    # `except ValueError` anywhere must not swallow the user's errors, nor the user's errors a bug's ValueError
    from probecache.serve.errors import PromptTooLong
    from probecache.train.errors import TrainError

    for error in (ServeError, PromptTooLong, TrainError):
        assert not issubclass(error, ValueError), error
