"""The server's bounds at their exact values, on a live server on loopback: a body of exactly
``max_body_bytes`` is read (one more byte is refused), and exactly ``max_queue`` sequences are accepted
(one more is refused with 429). Replicas are held on an event, not slowed by sleeps, so that 'accepted'
is what the server reports, whatever the machine's load."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import live_server, make_app, metric, wait_healthy

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


class Gate:
    """A loader_wrap whose replicas, once ``hold()`` is called, wait for ``release()`` before each batch."""

    def __init__(self):
        self.holding = threading.Event()
        self.open = threading.Event()

    def hold(self):
        self.holding.set()

    def release(self):
        self.open.set()

    def __call__(self, setup):
        for worker in setup.engine._workers:
            original = worker.replica.embed_batch

            def gated(seqs, original=original):
                if self.holding.is_set():
                    self.open.wait(30)
                return original(seqs)

            worker.replica.embed_batch = gated
        return setup


def wait_pending(client, want: int, waiting_on, timeout: float = 20) -> None:
    """Until the server reports ``want`` sequences accepted; fails at once if the request was answered instead."""
    import time

    deadline = time.time() + timeout
    while metric(client, "esm2cli_pending_sequences") != want:
        if waiting_on.done():
            raise AssertionError(f"answered before it was pending: {waiting_on.result().status_code}")
        assert time.time() < deadline, f"pending never reached {want}"
        time.sleep(0.01)


def test_exactly_max_queue_sequences_are_accepted(tiny_model_dir):
    gate = Gate()
    # One sequence, repeated: without cache_size=0 the cache would answer the repeats before they queue.
    app = make_app(tiny_model_dir, loader_wrap=gate, max_queue=4, batching=False, cache_size=0)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(2) as pool:
        wait_healthy(client)
        try:
            idle = client.post("/predict/batch", json={"sequences": ["MKV"] * 4})  # exactly max_queue, idle server
            assert idle.status_code == 200, idle.text
            # more than max_queue can never fit: 413 naming the limit, not a 429 clients would retry forever
            never = client.post("/predict/batch", json={"sequences": ["MKV"] * 5})
            assert never.status_code == 413 and "--max-queue 4" in never.text
            gate.hold()
            three = pool.submit(client.post, "/predict/batch", json={"sequences": ["MKV"] * 3})
            wait_pending(client, 3, three)
            refused = client.post("/predict/batch", json={"sequences": ["MKV"] * 2})  # 3 + 2 > 4
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            one = pool.submit(client.post, "/predict", json={"sequence": "MKV"})  # 3 + 1 = 4: accepted
            wait_pending(client, 4, one)
            assert client.post("/predict", json={"sequence": "MKV"}).status_code == 429  # 4 + 1 > 4
        finally:
            gate.release()
        assert three.result().status_code == 200 and one.result().status_code == 200
        assert metric(client, "esm2cli_pending_sequences") == 0
