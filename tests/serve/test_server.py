import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from live_server import live_server, make_app, metric, serve_process, slow_replicas, wait_healthy

from conftest import write_fasta
from esm2cli.cli import cli
from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig
from esm2cli.serve.app import create_app
from reference import DirectReference, cosine


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    return DirectReference(tiny_model_dir)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # cache_size=0: these tests measure the engine (batches, busy time), and some send the same sequences
    app = make_app(tiny_model_dir, devices="sim:2", max_body_bytes=64 * 1024, truncation=False, max_wait_ms=2,
                   cache_size=0)  # fmt: skip
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        yield client


def test_health_is_503_while_loading_then_200(tiny_model_dir):
    gate = threading.Event()

    def wait_for_gate(setup):
        gate.wait(30)
        return setup

    with live_server(make_app(tiny_model_dir, loader_wrap=wait_for_gate)) as url, httpx.Client(base_url=url) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert client.get("/live").status_code == 200  # loading is alive: liveness must not kill it
        refused = client.post("/predict", json={"sequence": "MKV"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        gate.set()
        body = wait_healthy(client)
    assert body["status"] == "ok" and body["logical_devices"] == 1 and body["devices"] == ["cpu"]
    assert body["physical_cuda_available"] is False
    assert body["model"] == Path(tiny_model_dir).name and tiny_model_dir not in json.dumps(body)  # no paths


def test_failed_load_reports_503_and_dead_without_showing_paths(tmp_path, caplog):
    missing = str(tmp_path / "missing")
    app = create_app(ServeConfig(), ModelConfig(model=missing), EmbedConfig())
    with live_server(app) as url, httpx.Client(base_url=url) as client:
        deadline = time.time() + 30
        while client.get("/health").json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error"].startswith("the model failed to load")
        assert str(tmp_path) not in health.text  # /health is open to anyone: the reason goes to the log
        assert client.get("/live").status_code == 503
    assert any("no such model directory" in r.getMessage() and missing in r.getMessage() for r in caplog.records)


def test_predict_one_matches_direct_computation(server, direct):
    answer = server.post("/predict", json={"sequence": "mkv la\nW*", "id": "p1"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["id"], body["length"], body["truncated"]) == ("p1", 6, False)
    assert cosine(np.array(body["embedding"]), direct.mean("MKVLAW")).min() >= 0.9999
    assert server.post("/predict", json={"sequence": "MKV"}).json()["id"] is None


def test_predict_batch_matches_esm2cli_embed(server, tiny_model_dir, proteins, tmp_path):
    records = [(rec_id, seq[:1000]) for rec_id, seq in (proteins * 2)[:64]]
    records = [(f"{rec_id}_{i}", seq) for i, (rec_id, seq) in enumerate(records)]
    payload = {"sequences": [{"id": rec_id, "sequence": seq} for rec_id, seq in records]}
    answer = server.post("/predict/batch", json=payload)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["id"] for r in results] == [rec_id for rec_id, _ in records]
    out = tmp_path / "out.parquet"
    fa = write_fasta(tmp_path / "in.fa", records)
    result = CliRunner().invoke(cli, ["embed", fa, "-o", str(out), "-m", tiny_model_dir])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table["id"].to_pylist() == [r["id"] for r in results]
    got = np.array([r["embedding"] for r in results])
    assert cosine(got, np.array(table["embedding"].to_pylist())).min() >= 0.9999
    plain = server.post("/predict/batch", json={"sequences": ["MKV", "LLW"]}).json()["results"]
    assert [(r["id"], r["length"]) for r in plain] == [(None, 3), (None, 3)]


INVALID = [
    ("/predict", {"sequence": "MKJV", "id": "x"}, "sequence (id 'x'): character(s) outside the ESM-2 alphabet: 'J'"),
    ("/predict", {"sequence": "  *", "id": "e"}, "empty sequence"),
    ("/predict", {"sequence": ""}, "empty sequence"),
    ("/predict/batch", {"sequences": ["MKV", {"sequence": "MK1", "id": "b"}]}, "sequences[1] (id 'b')"),
    ("/predict/batch", {"sequences": ["M"] * 65}, "batch size 65 > maximum allowed batch size 64"),
    ("/predict/batch", {"sequences": []}, "empty list"),
    ("/predict", {"sequence": "M" * 1100}, "1100 residues is over the maximum of 1022 (truncation is off)"),
    ("/predict", {"seq": "MKV"}, "sequence: Field required"),
    ("/predict", {"sequence": 12}, "sequence: Input should be a valid string"),
    ("/predict/batch", {"sequences": "MKV"}, "sequences: Input should be a valid list"),
    ("/predict", [1, 2], "Input should be a valid dictionary"),
]


@pytest.mark.parametrize("path, payload, message", INVALID)
def test_invalid_input_is_422_naming_the_item(server, path, payload, message):
    answer = server.post(path, json=payload)
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["error"]


@pytest.mark.parametrize(
    "content",
    [b'{"sequence": "MK', b"not json at all", b"\xff\xfe\x00garbage", b"", b'{"sequence": "MKV"}' * 2],
)
def test_garbage_bodies_are_422(server, content):
    answer = server.post("/predict", content=content, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error_type"] == "InputError"


def test_body_over_the_limit_is_422_declared_or_chunked(server):
    big = json.dumps({"sequence": "M" * 70_000}).encode()
    assert server.post("/predict", content=big, headers={"content-type": "application/json"}).status_code == 422

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    answer = server.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "request body over 65536 bytes" in answer.json()["error"]
    assert server.get("/health").status_code == 200


def test_32_concurrent_clients_get_their_own_answers(server, direct, proteins):
    pool = [seq[: 40 + 13 * i] for i, (_, seq) in enumerate(proteins[:24])]
    want = {seq: direct.mean(seq) for seq in pool}

    def client(k: int) -> list[tuple[str, list[float]]]:
        answers = []
        with httpx.Client(base_url=str(server.base_url), timeout=60) as own:
            for j in range(4):
                seq = pool[(k * 5 + j) % len(pool)]
                if j % 2:
                    r = own.post("/predict", json={"sequence": seq, "id": f"{k}-{j}"})
                    assert r.status_code == 200 and r.json()["id"] == f"{k}-{j}"
                    answers.append((seq, r.json()["embedding"]))
                else:
                    pair = [seq, pool[(k + j + 1) % len(pool)]]
                    r = own.post("/predict/batch", json={"sequences": pair})
                    assert r.status_code == 200
                    answers += [(s, res["embedding"]) for s, res in zip(pair, r.json()["results"], strict=True)]
        return answers

    with ThreadPoolExecutor(32) as executor:
        answers = [a for chunk in executor.map(client, range(32)) for a in chunk]
    assert len(answers) == 32 * 6
    for seq, vector in answers:
        assert cosine(np.array(vector), want[seq]).min() >= 0.9999
    sizes = server.get("/metrics").text
    assert "esm2cli_batch_size_count" in sizes


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


def test_a_request_that_can_never_fit_the_queue_is_413_naming_the_limit(tiny_model_dir):
    import openai

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


def test_several_layers_answer_by_layer(tiny_model_dir, direct):
    app = make_app(tiny_model_dir, embed=EmbedConfig(layers=(0, -1)))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_healthy(client)
        body = client.post("/predict", json={"sequence": "MKVLAW"}).json()
    assert body["embedding"] is None and sorted(body["embeddings"]) == ["l0", "l3"]
    assert cosine(np.array(body["embeddings"]["l0"]), direct.mean("MKVLAW", 0)).min() >= 0.9999


def test_sigterm_drains_requests_in_flight_and_exits_0(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESM2CLI_")}
    # A generous grace: on a loaded 2-core machine the 12 requests can take longer than the default 30 s,
    # and what is tested here is that they are drained, not how fast.
    args = ["-m", "esm2_t12_35M", "--load-format", "dummy", "--dtype", "float32", "--devices", "cpu",
            "--max-batch-size", "4", "--graceful-timeout", "600"]  # fmt: skip
    log = tmp_path / "stderr.log"
    proc, port = serve_process(args, log, env=env, stdout=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            wait_healthy(client, timeout=120)
            seq = "MKTAYIAKQRQISFVKSHFSRQ" * 40  # ~900 residues: each batch takes a while on the CPU

            def one(k):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as own:
                    return own.post("/predict", json={"sequence": seq, "id": str(k)})

            with ThreadPoolExecutor(12) as executor:
                futures = [executor.submit(one, k) for k in range(12)]
                deadline = time.time() + 60  # until every request is accepted (pending) or answered
                while _pending_or_done(client) < 12:
                    assert time.time() < deadline, "the requests never reached the server"
                    time.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * 12
        assert sorted(a.json()["id"] for a in answers) == sorted(str(k) for k in range(12))
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Shutting down" in log.read_text()


def _pending_or_done(client) -> float:
    done = metric(client, 'esm2cli_requests_total{endpoint="/predict",status="200"}')
    return metric(client, "esm2cli_pending_sequences") + done


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


def _throughput(app, seqs: list[str], clients: int) -> float:
    """Requests/s of ``clients`` concurrent single-sequence clients sending ``seqs`` between them."""
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        start = time.perf_counter()

        def one_client(share: list[str]) -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                for seq in share:
                    own.post("/predict", json={"sequence": seq}).raise_for_status()

        with ThreadPoolExecutor(clients) as executor:
            list(executor.map(one_client, [seqs[i::clients] for i in range(clients)]))
        return len(seqs) / (time.perf_counter() - start)


def test_batching_multiplies_throughput_where_each_call_costs_a_fixed_time(tiny_model_dir):
    # A GPU runs a batch of 16 short sequences in about the time of one: model that with a fixed
    # cost per engine call, then 16 clients get several times the throughput with batching on.
    seqs = [f"MKV{'A' * (k % 7)}W" for k in range(48)]
    slow = slow_replicas(0.08)  # 7 distinct sequences: without cache_size=0 the engine would hardly run
    on, off = (
        _throughput(make_app(tiny_model_dir, loader_wrap=slow, batching=b, max_wait_ms=5, cache_size=0), seqs, 16)
        for b in (True, False)
    )
    assert on >= 3 * off, (on, off)
