"""Error bodies: esm2cli's shape, or OpenAI's under /v1, with the headers each status carries."""

import httpx
import pytest
from live_server import (
    live_server,
    make_app,
    wait_healthy,
)


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
