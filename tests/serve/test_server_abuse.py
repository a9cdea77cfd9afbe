"""A live server under hostile clients: gone clients, slow headers and bodies, too many connections,
unencodable text, bodies that cannot be parsed, server errors, accept() failures."""

import json
import os
import resource
import socket
import time

import httpx
import pytest
from live_server import live_server, make_app, metric, raw_exchange, serve_process, slow_replicas, wait_healthy

from esm2cli.runtime.replica import BatchEmbeddings


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _json_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


@pytest.fixture(scope="module")
def guarded(tiny_model_dir):
    app = make_app(tiny_model_dir, max_wait_ms=1, header_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=64 * 1024)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        yield url, client


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


def test_half_sent_headers_get_408_and_the_connection_is_closed(guarded):
    url, client = guarded
    before = metric(client, 'esm2cli_connections_closed_total{reason="header_timeout"}')
    for partial in (b"", b"POST /predict HTTP/1.1\r\nhost: t\r\ncontent-"):
        start = time.perf_counter()
        raw = raw_exchange(url, partial)
        assert _status(raw) == 408 and "headers were not received within 0.5 s" in _json_body(raw)["error"]
        assert time.perf_counter() - start < 5
    # and after a first answer on a kept-alive connection, the next request's headers are timed too
    request = b"GET /live HTTP/1.1\r\nhost: t\r\n\r\nGET /live HTTP/1.1\r\nhost:"
    raw = raw_exchange(url, request)
    assert raw.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in raw
    assert metric(client, 'esm2cli_connections_closed_total{reason="header_timeout"}') == before + 3


def test_a_trickled_body_gets_408_and_is_counted(guarded):
    url, client = guarded
    before = metric(client, 'esm2cli_requests_total{endpoint="/predict",status="408"}')
    raw = raw_exchange(url, b'POST /predict HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n{"seq')
    assert _status(raw) == 408 and _json_body(raw)["error_type"] == "InputError"
    assert metric(client, 'esm2cli_requests_total{endpoint="/predict",status="408"}') == before + 1


def test_connections_past_the_cap_get_503_and_the_server_recovers(tiny_model_dir):
    app = make_app(tiny_model_dir, max_connections=8, header_timeout_s=30)
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(8)]
        time.sleep(0.2)
        raw = raw_exchange(url, b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        assert _status(raw) == 503 and b"retry-after: 1" in raw.lower()
        assert "too many open connections" in _json_body(raw)["error"]
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/live").status_code == 200
            assert metric(client, 'esm2cli_connections_closed_total{reason="over_capacity"}') == 1


def test_probes_are_answered_while_idle_connections_fill_the_cap(tiny_model_dir):
    app = make_app(tiny_model_dir, max_connections=4, header_timeout_s=30)
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=10) as client:
            wait_healthy(client)
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(4)]
        try:
            time.sleep(0.2)
            # raw_exchange reads until the server closes: a probe over the cap gets one answer, then the close.
            for request in (b"GET /live HTTP/1.1\r\nhost: t\r\n\r\n", b"GET /health?x=1 HTTP/1.1\r\nhost: t\r\n\r\n"):
                raw = raw_exchange(url, request)
                assert _status(raw) == 200, raw
            raw = raw_exchange(url, b"HEAD /live HTTP/1.1\r\nhost: t\r\n\r\n")
            assert _status(raw) == 200, raw
            # Not a probe: still refused while the cap holds, also a path that merely starts like one.
            for request in (b"POST /predict HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}",
                            b"GET /lively HTTP/1.1\r\nhost: t\r\n\r\n"):  # fmt: skip
                assert _status(raw_exchange(url, request)) == 503
        finally:
            for sock in idle:
                sock.close()


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


@pytest.mark.parametrize(
    "content, headers, message",
    [
        ("[" * 60_000, {}, "nested too deeply"),
        ('{"sequence": ' * 2000 + '"MKV"' + "}" * 2000, {}, "nested too deeply"),
        (b'{"sequence": "MK\xffV"}', {}, "not UTF-8"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", {"content-encoding": "gzip"}, "Content-Encoding 'gzip' is not accepted"),
        (b'{"sequence": "MKV"}', {"content-encoding": "br"}, "Content-Encoding 'br'"),
    ],
)
def test_bodies_that_cannot_be_parsed_are_422_in_the_documented_shape(guarded, content, headers, message):
    _, client = guarded
    answer = client.post("/predict", content=content, headers={"content-type": "application/json", **headers})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error_type"] == "InputError" and message in answer.json()["error"]
    assert client.get("/health").status_code == 200


def test_head_on_probes_and_documented_errors_for_unknown_routes_and_methods(guarded):
    _, client = guarded
    for path in ("/health", "/live"):
        head = client.head(path)
        assert head.status_code == 200 and head.content == b""
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error_type"] == "HTTPError"
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"] and wrong.json()["error"]


def _broken_answers(setup):
    # A replica that answers without the layer the server asked for: a bug in the server's terms.
    for worker in setup.engine._workers:
        worker.replica.embed_batch = lambda seqs: BatchEmbeddings({99: None}, {})
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


def test_accept_errors_are_logged_once_per_interval(tiny_model_dir, tmp_path):
    # A server with few file descriptors and a flood of idle connections: accept() fails with EMFILE
    # about once a second; the log gets one line, not one traceback each time.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESM2CLI_")}
    args = ["-m", tiny_model_dir, "--devices", "cpu", "--dtype", "float32", "--max-connections", "4000",
            "--header-timeout", "30"]  # fmt: skip

    def few_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    log_path = tmp_path / "stderr.log"
    proc, port = serve_process(args, log_path, env=env, preexec_fn=few_files)
    flood = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_healthy(client, timeout=120)
            for _ in range(600):
                try:
                    flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                except OSError:
                    break
            time.sleep(3.5)  # asyncio retries accept() every second
            for sock in flood:
                sock.close()
            flood.clear()
            time.sleep(1.5)
            assert client.get("/health").status_code == 200  # serving again
        proc.terminate()
        proc.wait(timeout=60)
    finally:
        for sock in flood:
            sock.close()
        if proc.poll() is None:
            proc.kill()
    err = log_path.read_text()
    assert "does not fit the open-file limit (256)" in err  # the cap was lowered to fit
    assert err.count("cannot accept connections") == 1, err[-3000:]
    assert "out of system resource" not in err and "Traceback" not in err


def test_garbage_requests_get_a_json_400_and_are_logged_at_most_once(guarded, caplog):
    url, _ = guarded
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\ncontent-length: nope\r\n\r\n"):
        raw = raw_exchange(url, garbage)
        assert _status(raw) == 400 and _json_body(raw) == {"error": "invalid HTTP request", "error_type": "InputError"}
    logged = [r for r in caplog.records if r.getMessage() == "Invalid HTTP request received."]
    assert len(logged) <= 1


def test_a_client_that_does_not_read_its_answers_is_dropped(guarded):
    url, client = guarded
    answer_size = len(client.get("/openapi.json").content)
    host, port = url.removeprefix("http://").split(":")
    request = b"GET /openapi.json HTTP/1.1\r\nhost: t\r\n\r\n"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(request * 2000)  # pipelined: far more answer than the socket buffers hold; never read
        time.sleep(3)  # the server's writes pause, and after body_timeout_s (0.5 s) it drops the connection
        sock.settimeout(5)
        received = 0
        while chunk := sock.recv(1 << 20):  # what the kernel buffers held, then the end: no timeout here
            received += len(chunk)
    assert received < 2000 * answer_size / 2
    assert metric(client, 'esm2cli_connections_closed_total{reason="send_timeout"}') == 1
    assert client.get("/health").status_code == 200
