"""Error bodies: esm2cli's shape, or OpenAI's under /v1, with the headers each status carries."""

import json

import httpx
import pytest
from live_server import (
    live_server,
    make_app,
    wait_healthy,
)

from esm2cli.serve.http_errors import encode, error_headers, error_payload, is_openai_path


@pytest.fixture(scope="module")
def http(tiny_model_dir):
    with live_server(make_app(tiny_model_dir, max_wait_ms=1)) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        yield client


def test_v1_body_errors_take_openais_shape_too(http):
    for content, headers in [
        (b'{"input": "MK', {}),
        ("[" * 100_000, {}),
        (b'{"input": "\xff"}', {}),
        (b"\x1f\x8b\x08\x00", {"content-encoding": "gzip"}),
    ]:
        answer = http.post("/v1/embeddings", content=content, headers={"content-type": "application/json", **headers})
        assert answer.status_code == 422, (content[:20], answer.text)
        assert answer.json()["error"]["type"] == "invalid_request_error"


def test_esm2cli_routes_get_their_own_shape_and_v1_gets_openais():
    assert error_payload("/predict", 422, "bad", "InputError") == {"error": "bad", "error_type": "InputError"}
    assert error_payload("/v1/embeddings", 429, "full", "OverloadedError") == {
        "error": {"message": "full", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    }
    assert error_payload("/v1", 500, "boom", "InternalError", param="x")["error"]["type"] == "server_error"
    assert not is_openai_path("/v1x") and is_openai_path("/v1/models")


def test_each_status_carries_its_headers_and_no_text_can_break_an_answer():
    assert (b"retry-after", b"1") in error_headers(503) and (b"retry-after", b"1") in error_headers(429)
    assert (b"www-authenticate", b"Bearer") in error_headers(401)
    assert error_headers(422) == [(b"content-type", b"application/json")]
    body = encode(error_payload("/predict", 422, "id '\ud800'", "InputError"))  # a lone surrogate from a request
    assert json.loads(body)["error"] == "id '\ud800'" and body.isascii()
