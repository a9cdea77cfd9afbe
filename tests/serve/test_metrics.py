"""Prometheus metrics of a live server: requests, latency, batches, queue, device busy time, the cache's own counts."""

from live_server import (
    metric,
)


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
