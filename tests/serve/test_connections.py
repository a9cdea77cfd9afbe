"""Connection bounds below the app: header timeout, the connection cap (probes still answered), clients that
stop reading, requests that are not HTTP, accept() errors; and the one seam over uvicorn's internals."""

import os
import resource
import socket
import time

import httpx
from live_server import (
    json_body,
    live_server,
    make_app,
    metric,
    raw_exchange,
    serve_process,
    status_of,
    wait_healthy,
)


def test_half_sent_headers_get_408_and_the_connection_is_closed(guarded):
    url, client = guarded
    before = metric(client, 'esm2cli_connections_closed_total{reason="header_timeout"}')
    for partial in (b"", b"POST /predict HTTP/1.1\r\nhost: t\r\ncontent-"):
        start = time.perf_counter()
        raw = raw_exchange(url, partial)
        assert status_of(raw) == 408 and "headers were not received within 0.5 s" in json_body(raw)["error"]
        assert time.perf_counter() - start < 5
    # and after a first answer on a kept-alive connection, the next request's headers are timed too
    request = b"GET /live HTTP/1.1\r\nhost: t\r\n\r\nGET /live HTTP/1.1\r\nhost:"
    raw = raw_exchange(url, request)
    assert raw.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in raw
    assert metric(client, 'esm2cli_connections_closed_total{reason="header_timeout"}') == before + 3


def test_connections_past_the_cap_get_503_and_the_server_recovers(tiny_model_dir):
    app = make_app(tiny_model_dir, max_connections=8, header_timeout_s=30)
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(8)]
        time.sleep(0.2)
        raw = raw_exchange(url, b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        assert status_of(raw) == 503 and b"retry-after: 1" in raw.lower()
        assert "too many open connections" in json_body(raw)["error"]
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
                assert status_of(raw) == 200, raw
            raw = raw_exchange(url, b"HEAD /live HTTP/1.1\r\nhost: t\r\n\r\n")
            assert status_of(raw) == 200, raw
            # Not a probe: still refused while the cap holds, also a path that merely starts like one.
            for request in (b"POST /predict HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}",
                            b"GET /lively HTTP/1.1\r\nhost: t\r\n\r\n"):  # fmt: skip
                assert status_of(raw_exchange(url, request)) == 503
        finally:
            for sock in idle:
                sock.close()


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
        assert status_of(raw) == 400 and json_body(raw) == {"error": "invalid HTTP request", "error_type": "InputError"}
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
