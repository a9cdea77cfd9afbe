"""The dynamic batcher: coalescing, the queue bound at its exact value, and its slots, given back on every path."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from live_server import (
    Gate,
    live_server,
    make_app,
    metric,
    slow_replicas,
    wait_healthy,
    wait_pending,
)

from reference import cosine


def test_full_queue_answers_429_at_once_with_retry_after(tiny_model_dir):
    app = make_app(tiny_model_dir, loader_wrap=slow_replicas(0.5), max_queue=4, batching=False)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_healthy(client)

        def one(_):
            with httpx.Client(base_url=url, timeout=30) as own:
                start = time.perf_counter()
                r = own.post("/predict", json={"sequence": "MKVLA"})
                return r.status_code, r.headers.get("retry-after"), time.perf_counter() - start

        with ThreadPoolExecutor(12) as executor:
            results = list(executor.map(one, range(12)))
    refused = [r for r in results if r[0] == 429]
    accepted = [r for r in results if r[0] == 200]
    assert refused and all(r[1] == "1" for r in refused)
    # At once, not after queuing: each accepted request waited at least one 0.5 s batch (exact: test_server_limits).
    assert max(r[2] for r in refused) < min(r[2] for r in accepted), results
    assert {r[0] for r in results} == {200, 429}


def _batch_stats(client) -> tuple[float, float]:
    lines = client.get("/metrics").text.splitlines()
    count = next(float(x.split()[-1]) for x in lines if x.startswith("esm2cli_batch_size_count"))
    total = next(float(x.split()[-1]) for x in lines if x.startswith("esm2cli_batch_size_sum"))
    return count, total


@pytest.mark.parametrize("batching", [True, False])
def test_dynamic_batching_coalesces_concurrent_requests(tiny_model_dir, direct, batching):
    app = make_app(tiny_model_dir, loader_wrap=slow_replicas(0.3), batching=batching, max_wait_ms=50)
    seqs = [f"MKV{'A' * k}W" for k in range(12)]
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        before = _batch_stats(client)

        def one(seq):
            with httpx.Client(base_url=url, timeout=60) as own:
                return own.post("/predict", json={"sequence": seq}).json()["embedding"]

        with ThreadPoolExecutor(12) as executor:
            vectors = list(executor.map(one, seqs))
        count, total = (a - b for a, b in zip(_batch_stats(client), before, strict=True))
    assert total == 12
    if batching:
        assert count <= 4  # 12 requests in at most 4 engine batches
    else:
        assert count == 12
    for seq, vector in zip(seqs, vectors, strict=True):
        assert cosine(np.array(vector), direct.mean(seq)).min() >= 0.9999


def _engine_batches(app, seqs: list[str], clients: int) -> tuple[float, float]:
    """(engine batches, sequences in them) for ``clients`` concurrent single-sequence clients sending ``seqs``."""
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        before = _batch_stats(client)

        def one_client(share: list[str]) -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                for seq in share:
                    own.post("/predict", json={"sequence": seq}).raise_for_status()

        with ThreadPoolExecutor(clients) as executor:
            list(executor.map(one_client, [seqs[i::clients] for i in range(clients)]))
        count, total = (a - b for a, b in zip(_batch_stats(client), before, strict=True))
        return count, total


def test_batching_coalesces_clients_where_each_call_costs_a_fixed_time(tiny_model_dir):
    # A GPU runs a batch of 16 short sequences in about the time of one: model that with a fixed cost per
    # engine call. Then what batching gains is the ratio of engine calls, counted here; the throughput itself
    # moves with the machine's load and is measured side by side by benchmarks/serve_bench.py.
    seqs = [f"MKV{'A' * (k % 7)}W" for k in range(48)]
    slow = slow_replicas(0.08)  # 7 distinct sequences: without cache_size=0 the engine would hardly run
    (on, on_seqs), (off, off_seqs) = (
        _engine_batches(make_app(tiny_model_dir, loader_wrap=slow, batching=b, max_wait_ms=5, cache_size=0), seqs, 16)
        for b in (True, False)
    )
    assert on_seqs == off_seqs == 48
    assert off == 48  # one engine call a request
    assert off >= 3 * on, (on, off)  # 16 waiting clients share calls: at least 3 sequences a call


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
