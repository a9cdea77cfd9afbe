"""The request guard on a live server: body limits at their exact value, body timeouts, clients that leave
during their body, and unexpected errors as a JSON 500."""

import asyncio
import hashlib
import json
import socket
import time

import httpx
import pytest
from live_server import (
    json_body,
    live_server,
    make_app,
    metric,
    raw_exchange,
    status_of,
    wait_healthy,
)

from esm2cli.io.schema import Embeddings
from esm2cli.serve.auth import KeyChecker
from esm2cli.serve.cache import OPEN_PARTITION
from esm2cli.serve.guard import CLIENT_SCOPE_KEY, RequestGuard
from esm2cli.serve.metrics import ServerMetrics


def test_body_over_the_limit_is_422_declared_or_chunked(server):
    big = json.dumps({"sequence": "M" * 70_000}).encode()
    assert server.post("/predict", content=big, headers={"content-type": "application/json"}).status_code == 422

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    answer = server.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "request body over 65536 bytes" in answer.json()["error"]
    assert server.get("/health").status_code == 200


KEY_A = "k-alpha-0123456789abcdef"
KEY_B = "k-bravo-fedcba9876543210"


LIMIT = 300  # bytes


def body_of(size: int) -> bytes:
    """A valid /predict body of exactly ``size`` bytes (JSON padded with spaces)."""
    core = json.dumps({"sequence": "MKVLAW", "id": "p"})
    assert len(core) <= size
    return core[:-1].encode() + b" " * (size - len(core)) + b"}"


@pytest.fixture(scope="module")
def small_body_server(tiny_model_dir):
    app = make_app(tiny_model_dir, max_body_bytes=LIMIT)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_healthy(client)
        yield client


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_exactly_max_body_bytes_is_read_and_one_more_byte_is_refused(small_body_server, chunked):
    client = small_body_server

    def post(body: bytes) -> httpx.Response:
        content = iter([body[:100], body[100:]]) if chunked else body  # a generator: no content-length
        return client.post("/predict", content=content, headers={"content-type": "application/json"})

    exact = post(body_of(LIMIT))
    assert exact.status_code == 200, exact.text
    assert exact.json()["length"] == 6
    over = post(body_of(LIMIT + 1))
    assert over.status_code == 422 and f"request body over {LIMIT} bytes" in over.json()["error"]


def test_a_gone_client_is_counted_499_even_when_it_left_during_its_body(guarded):
    url, client = guarded
    before = metric(client, 'esm2cli_requests_total{endpoint="/predict",status="499"}')
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"
        )
        time.sleep(0.1)
    deadline = time.time() + 5
    while (
        metric(client, 'esm2cli_requests_total{endpoint="/predict",status="499"}') == before and time.time() < deadline
    ):
        time.sleep(0.02)
    assert metric(client, 'esm2cli_requests_total{endpoint="/predict",status="499"}') == before + 1


def test_a_trickled_body_gets_408_and_is_counted(guarded):
    url, client = guarded
    before = metric(client, 'esm2cli_requests_total{endpoint="/predict",status="408"}')
    raw = raw_exchange(url, b'POST /predict HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n{"seq')
    assert status_of(raw) == 408 and json_body(raw)["error_type"] == "InputError"
    assert metric(client, 'esm2cli_requests_total{endpoint="/predict",status="408"}') == before + 1


def _broken_answers(setup):
    # A replica that answers without the layer the server asked for: a bug in the server's terms.
    for worker in setup.engine._workers:
        worker.replica.embed_batch = lambda seqs: Embeddings({99: None}, {})
    return setup


def test_a_server_error_is_a_json_500_and_counted(tiny_model_dir):
    app = make_app(tiny_model_dir, loader_wrap=_broken_answers)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_healthy(client)
        answer = client.post("/predict", json={"sequence": "MKV"})
        assert answer.status_code == 500 and answer.json() == {
            "error": "internal server error (see the server log)",
            "error_type": "InternalError",
        }
        v1 = client.post("/v1/embeddings", json={"input": "MKV", "model": app.state.model_id})
        assert v1.status_code == 500 and v1.json()["error"]["type"] == "server_error"
        assert metric(client, 'esm2cli_requests_total{endpoint="/predict",status="500"}') == 1
        assert metric(client, 'esm2cli_requests_total{endpoint="/v1/embeddings",status="500"}') == 1


def _through_guard(keys: KeyChecker, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[list[int], dict]:
    """Runs one request through the guard to an app that records its scope; returns (statuses sent, that scope)."""
    seen: dict = {}

    async def app(scope, receive, send):
        seen.update(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = RequestGuard(app, keys=keys, metrics=ServerMetrics(), endpoints=frozenset({path}), max_body_bytes=100,
                         body_timeout_s=1)  # fmt: skip
    sent: list[int] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    scope = {"type": "http", "method": "GET", "path": path, "headers": headers, "client": ("127.0.0.1", 1)}
    asyncio.run(guard(scope, receive, send))
    return sent, seen


def test_the_guard_names_the_client_by_its_key_s_digest():
    keys = KeyChecker([KEY_A, KEY_B], public_metrics=True)
    sent, scope = _through_guard(keys, "/predict", [(b"authorization", f"Bearer {KEY_B}".encode())])
    assert sent == [200] and scope[CLIENT_SCOPE_KEY] == hashlib.sha256(KEY_B.encode()).digest()
    sent, scope = _through_guard(keys, "/predict", [(b"authorization", b"Bearer k-wrong-0123456789abcdef")])
    assert sent == [401] and not scope  # refused before the app
    sent, scope = _through_guard(keys, "/metrics", [(b"authorization", f"Bearer {KEY_A}".encode())])
    assert scope[CLIENT_SCOPE_KEY] == hashlib.sha256(KEY_A.encode()).digest()  # a key on an open path still counts
    sent, scope = _through_guard(keys, "/metrics", [])
    assert sent == [200] and scope[CLIENT_SCOPE_KEY] == OPEN_PARTITION
    sent, scope = _through_guard(KeyChecker([]), "/predict", [(b"authorization", f"Bearer {KEY_A}".encode())])
    assert scope[CLIENT_SCOPE_KEY] == OPEN_PARTITION  # no keys: one partition for everyone
