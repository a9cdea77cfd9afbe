"""EmbeddingService: readiness, checks, the cache, and the race of the answer against the client leaving and the
timeout, driven directly (no app, no socket) and over HTTP."""

import json
import socket
import time

import httpx
import openai
import pytest
from live_server import (
    live_server,
    make_app,
    metric,
    slow_replicas,
    wait_healthy,
)

from esm2cli.config import EmbedConfig


def test_a_request_that_can_never_fit_the_queue_is_413_naming_the_limit(tiny_model_dir):

    embed = EmbedConfig(truncate=50, long_sequences="window", window_overlap=10)
    app = make_app(tiny_model_dir, embed=embed, max_queue=6, max_client_batch=16)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_healthy(client)
        assert client.post("/predict", json={"sequence": "MKVLA" * 40}).status_code == 200  # 5 windows: fits
        answer = client.post("/predict", json={"sequence": "MKVLA" * 60})  # 300 residues: 8 windows of 50 (stride 40)
        assert answer.status_code == 413, answer.text
        assert "needs 8 queue places" in answer.json()["error"] and "--max-queue 6" in answer.json()["error"]
        assert "retry-after" not in answer.headers
        answer = client.post("/predict/batch", json={"sequences": [{"sequence": "MKV"}] * 7})
        assert answer.status_code == 413 and "needs 7 queue places" in answer.json()["error"]
        # The openai client retries 429 (by default, a queue that never drains: forever); 413 it does not.
        model_id = client.get("/v1/models").json()["data"][0]["id"]
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=2)
        with pytest.raises(openai.APIStatusError, match="--max-queue 6") as info:
            api.embeddings.create(model=model_id, input="MKVLA" * 60)
        assert info.value.status_code == 413


def test_request_timeout_is_503(tiny_model_dir):
    app = make_app(tiny_model_dir, loader_wrap=slow_replicas(1.0), request_timeout_s=0.2)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_healthy(client)
        answer = client.post("/predict", json={"sequence": "MKV"})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "not answered within 0.2 s" in answer.json()["error"]


@pytest.mark.slow  # the exact max_queue boundary has a fast twin: test_server_limits.py
def test_work_of_clients_that_left_is_dropped_before_it_reaches_a_replica(tiny_model_dir, proteins):
    # The case: 60 requests of 64 x 1,022 residues whose sockets close at once. Without
    # cancellation the queue stays full (others get 429) while the replicas compute answers for nobody.
    # 64 sequences: >3 s. One sequence, repeated: without cache_size=0 the cache would answer them all at once.
    app = make_app(tiny_model_dir, loader_wrap=slow_replicas(0.05), max_wait_ms=1, cache_size=0)
    long_seq = "".join(seq for _, seq in proteins)[:1022]
    body = json.dumps({"sequences": [long_seq] * 64}).encode()
    request = b"POST /predict/batch HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    request += b"content-length: %d\r\n\r\n" % len(body) + body
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        start = time.perf_counter()
        assert client.post("/predict", json={"sequence": long_seq}).status_code == 200
        alone = time.perf_counter() - start  # the same request on an idle server
        host, port = url.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port))) for _ in range(60)]
        for sock in socks:
            sock.sendall(request)
        deadline = time.time() + 30
        while metric(client, "esm2cli_pending_sequences") < 2048 and time.time() < deadline:
            time.sleep(0.05)  # until the queue is full: 32 requests accepted, the rest answered 429
        assert metric(client, "esm2cli_pending_sequences") == 2048
        for sock in socks:
            sock.close()
        closed = time.perf_counter()
        while metric(client, "esm2cli_pending_sequences") > 0 and time.perf_counter() - closed < 10:
            time.sleep(0.02)
        freed = time.perf_counter() - closed
        start = time.perf_counter()
        answer = client.post("/predict", json={"sequence": long_seq})
        served = time.perf_counter() - start
        assert answer.status_code == 200
        gone = metric(client, 'esm2cli_requests_total{endpoint="/predict/batch",status="499"}')
        refused = metric(client, 'esm2cli_requests_total{endpoint="/predict/batch",status="429"}')
        batches = metric(client, "esm2cli_batch_size_count")
    print(f"queue freed in {freed:.3f} s; next request {served:.3f} s (alone: {alone:.3f} s); {batches:.0f} batches")
    assert freed < 2.0, f"the queue took {freed:.1f} s to empty"  # 2,048 sequences would take > 100 s to compute
    assert served < alone + 1.0, f"the next request took {served:.1f} s, {alone:.1f} s on an idle server"
    assert gone == 32 and refused == 28
    assert batches < 200 + 1  # of the 2,048 accepted sequences, only those already at a replica ran


@pytest.mark.parametrize(
    "payload, message",
    [
        ('{"sequence": "MKV", "id": "\\ud800"}', "sequence (id '\\\\ud800'): the id holds a surrogate (U+D800"),
        ('{"sequences": [{"sequence": "MKV", "id": "a\\udfffb"}]}', "sequences[0] (id 'a\\\\udfffb'): the id holds"),
        ('{"sequence": "MKV", "id": "a\\u001b[2Jb"}', "the id holds a control character (U+001B at character 2)"),
        ('{"sequence": "MK\\ud800V"}', "outside the ESM-2 alphabet"),
        ('{"sequence": "MK\\u00dfV"}', "outside the ESM-2 alphabet"),  # 'ß' upper-cases to 'SS': refused
    ],
)
def test_unencodable_ids_and_sequences_are_422_before_any_compute(guarded, payload, message):
    _, client = guarded
    path = "/predict/batch" if "sequences" in payload else "/predict"
    before = metric(client, f'esm2cli_requests_total{{endpoint="{path}",status="422"}}')
    batches = metric(client, "esm2cli_batch_size_count")
    answer = client.post(path, content=payload.encode(), headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["error_type"] == "InputError", answer.text
    assert message.replace("\\\\", "\\") in answer.json()["error"]
    assert metric(client, f'esm2cli_requests_total{{endpoint="{path}",status="422"}}') == before + 1
    assert metric(client, "esm2cli_batch_size_count") == batches
