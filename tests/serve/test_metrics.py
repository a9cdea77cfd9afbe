"""Prometheus metrics of a live server: requests, latency, batches, queue, device busy time, the cache's own counts."""

import numpy as np
from live_server import (
    metric,
)

from esm2cli.config import EmbedConfig
from esm2cli.serve.cache import EmbeddingCache, cache_identity
from esm2cli.serve.metrics import ServerMetrics


def test_metrics_expose_requests_latency_batches_queue_and_busy_time(server):
    names = ('esm2cli_requests_total{endpoint="/predict",status="200"}',
             'esm2cli_request_seconds_count{endpoint="/predict"}', "esm2cli_batch_size_sum")  # fmt: skip
    busy = 'esm2cli_device_busy_seconds_total{device="sim:%d"}'
    before = [metric(server, name) for name in names] + [metric(server, busy % 0) + metric(server, busy % 1)]
    assert server.post("/predict", json={"sequence": "MKV"}).status_code == 200
    after = [metric(server, name) for name in names] + [metric(server, busy % 0) + metric(server, busy % 1)]
    assert [a - b for a, b in zip(after[:3], before[:3], strict=True)] == [1, 1, 1]  # one request, one sequence
    assert after[3] > before[3]  # a replica was busy for it
    assert metric(server, "esm2cli_queue_depth") == 0 and metric(server, "esm2cli_pending_sequences") == 0  # idle
    text = server.get("/metrics").text
    for name in (
        'esm2cli_requests_total{endpoint="/predict",status="200"}',
        'esm2cli_request_seconds_bucket{endpoint="/predict"',
        "esm2cli_batch_size_bucket",
        "esm2cli_queue_depth",
        'esm2cli_device_busy_seconds_total{device="sim:0"}',
        'esm2cli_device_busy_seconds_total{device="sim:1"}',
    ):
        assert name in text, name


def test_a_scrape_shows_the_cache_counts_of_its_own_key_only():
    metrics = ServerMetrics()
    assert b"esm2cli_cache_hits_total" not in metrics.render()  # no cache watched: no cache samples
    cache = EmbeddingCache(4, cache_identity(weights="m", dtype="float32", embed=EmbedConfig(), model_family="esm2"))
    metrics.watch_cache(cache)
    for _ in range(3):
        cache.get(b"other", "MKV")  # another key's misses
    cache.put(b"other", "MKV", {0: np.ones(2, np.float32)})
    cache.get(b"other", "MKV")
    cache.get(b"mine", "MKV")

    def sample(text: bytes, name: str) -> float:
        (line,) = [x for x in text.decode().splitlines() if x.startswith(name + " ")]
        return float(line.split()[-1])

    mine, other = metrics.render(b"mine"), metrics.render(b"other")
    assert [sample(mine, n) for n in ("esm2cli_cache_hits_total", "esm2cli_cache_misses_total")] == [0, 1]
    assert sample(mine, "esm2cli_cache_entries") == 0
    assert [sample(other, n) for n in ("esm2cli_cache_hits_total", "esm2cli_cache_misses_total")] == [1, 3]
    assert sample(other, "esm2cli_cache_entries") == 1
    assert sample(metrics.render(), "esm2cli_cache_misses_total") == 0  # no key: the open partition's own


def test_connections_closed_are_counted_by_reason():
    metrics = ServerMetrics()
    metrics.connection_closed("header_timeout")
    metrics.connection_closed("header_timeout")
    assert b'esm2cli_connections_closed_total{reason="header_timeout"} 2.0' in metrics.render()
