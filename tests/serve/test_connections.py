"""Connection bounds below the app: header timeout, the connection cap (probes still answered), clients that
stop reading, requests that are not HTTP, accept() errors; and the one seam over uvicorn's internals."""

import asyncio
import asyncio.constants
import os
import resource
import socket
import time

import httpx
import uvicorn
from live_server import (
    GUARDED,
    json_body,
    live_server,
    make_app,
    metric,
    open_connections,
    raw_exchange,
    serve_process,
    status_of,
    wait_healthy,
)

from esm2cli.serve.connections import ConnectionGuard, ConnectionLimits, H11Connection, guarded_protocol
from helpers import eventually, eventually_async


def test_half_sent_headers_get_408_and_the_connection_is_closed(guarded):
    url, client = guarded
    before = metric(client, 'esm2cli_connections_closed_total{reason="header_timeout"}')
    timeout = GUARDED["header_timeout_s"]
    for partial in (b"", b"POST /predict HTTP/1.1\r\nhost: t\r\ncontent-"):
        start = time.monotonic()
        raw = raw_exchange(url, partial)  # a server that never answers fails on its socket timeout, not here
        assert status_of(raw) == 408 and f"headers were not received within {timeout} s" in json_body(raw)["error"]
        # Waiting the timeout out is the behaviour: the 408 comes when it runs out, not before (the headers
        # still had time). 10 ms: asyncio runs a timer up to its clock's resolution early.
        assert time.monotonic() - start >= timeout - 0.01
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
        eventually(lambda: open_connections(app) == 8, what="the server holds the 8 idle connections")
        raw = raw_exchange(url, b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        assert status_of(raw) == 503 and b"retry-after: 1" in raw.lower()
        assert "too many open connections" in json_body(raw)["error"]
        for sock in idle:
            sock.close()
        eventually(lambda: open_connections(app) == 0, what="the server saw the idle connections close")
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
            eventually(lambda: open_connections(app) == 4, what="the server holds the 4 idle connections")
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
            eventually(lambda: "cannot accept connections" in log_path.read_text(), what="the first accept error")
            # Waiting is the behaviour here: asyncio retries accept() every ACCEPT_RETRY_DELAY s, and the
            # retries of these intervals must be the ones not logged.
            time.sleep(2.5 * asyncio.constants.ACCEPT_RETRY_DELAY)
            for sock in flood:
                sock.close()
            flood.clear()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as fresh:
                wait_healthy(fresh)  # serving again, on a new connection: accept() works
        # At once, while asyncio's accept() retries are still pending: a retry that fires after the server
        # closed its socket must not be logged as a traceback.
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
        # The server's writes pause, and after body_timeout_s it drops the connection: read only after that.
        eventually(lambda: metric(client, 'esm2cli_connections_closed_total{reason="send_timeout"}') == 1,
                   what="the reader that stopped dropped")  # fmt: skip
        sock.settimeout(5)
        received = 0
        while chunk := sock.recv(1 << 20):  # what the kernel buffers held, then the end: no timeout here
            received += len(chunk)
    assert received < 2000 * answer_size / 2
    assert metric(client, 'esm2cli_connections_closed_total{reason="send_timeout"}') == 1
    assert client.get("/health").status_code == 200


class FakeTimer:
    def __init__(self, delay: float, callback):
        self.delay, self.callback, self.cancelled = delay, callback, False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert not self.cancelled, "a cancelled timer fired"
        self.callback()


class FakeConnection:
    """The Connection protocol without uvicorn: records what the guard does to it."""

    def __init__(self, open_connections: int = 1):
        self.open = open_connections
        self.awaiting = True
        self.pipelined = False
        self.closed = self.aborted = False
        self.fed = b""
        self.answers: list[bytes] = []
        self.timers: list[FakeTimer] = []

    def open_connections(self) -> int:
        return self.open

    def awaiting_headers(self) -> bool:
        return self.awaiting and not self.closed

    def has_pipelined_bytes(self) -> bool:
        return self.pipelined

    def closing(self) -> bool:
        return self.closed

    def later(self, delay, callback):
        self.timers.append(FakeTimer(delay, callback))
        return self.timers[-1]

    def feed(self, data: bytes) -> None:
        self.fed += data
        self.awaiting = b"\r\n\r\n" not in self.fed  # a request's headers are complete

    def answer_and_close(self, answer: bytes) -> None:
        self.answers.append(answer)
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def guard_of(conn: FakeConnection) -> tuple[ConnectionGuard, list[str]]:
    closes: list[str] = []
    limits = ConnectionLimits(header_timeout_s=10, max_connections=4, send_timeout_s=30, on_close=closes.append)
    return ConnectionGuard(conn, limits), closes


def test_the_guard_times_headers_and_lets_complete_ones_through():
    conn = FakeConnection()
    guard, closes = guard_of(conn)
    guard.opened()
    (timer,) = conn.timers
    assert timer.delay == 10
    guard.received(b"GET /live HTTP/1.1\r\nhost: t\r\n\r\n")
    assert timer.cancelled and conn.fed.startswith(b"GET /live") and not closes
    late = FakeConnection()
    guard, closes = guard_of(late)
    guard.opened()
    guard.received(b"POST /predict HTTP/1.1\r\nhost:")  # half the headers, then nothing
    late.timers[0].fire()
    assert closes == ["header_timeout"] and status_of(late.answers[0]) == 408
    assert "not received within 10 s" in json_body(late.answers[0])["error"]


def test_the_guard_over_the_cap_serves_a_probe_once_and_refuses_the_rest():
    probe = FakeConnection(open_connections=5)
    guard, closes = guard_of(probe)
    guard.opened()
    guard.received(b"GET /hea")  # the request line is not complete yet: held back
    assert probe.fed == b"" and not probe.answers
    guard.received(b"lth?x=1 HTTP/1.1\r\nhost: t\r\n\r\n")
    assert probe.fed.startswith(b"GET /health?x=1") and probe.timers[0].cancelled and not closes
    guard.response_completing()
    assert probe.closed  # one answer, never a kept-alive connection
    for first_bytes in (b"POST /predict HTTP/1.1\r\n", b"GET /lively HTTP/1.1\r\n", b"x" * 300):
        other = FakeConnection(open_connections=5)
        guard, closes = guard_of(other)
        guard.opened()
        guard.received(first_bytes)
        assert closes == ["over_capacity"] and status_of(other.answers[0]) == 503 and other.fed == b""
    silent = FakeConnection(open_connections=5)
    guard, closes = guard_of(silent)
    guard.opened()
    silent.timers[0].fire()  # nothing sent within the wait: 503 all the same
    assert closes == ["over_capacity"] and b"retry-after: 1" in silent.answers[0]


def test_the_guard_drops_a_reader_that_stops_and_spares_one_that_resumes():
    conn = FakeConnection()
    guard, closes = guard_of(conn)
    guard.writes_paused()
    guard.writes_resumed()
    assert conn.timers[-1].cancelled and not conn.aborted
    guard.writes_paused()
    assert conn.timers[-1].delay == 30
    conn.timers[-1].fire()
    assert conn.aborted and closes == ["send_timeout"]


def test_the_guard_answers_bad_bytes_with_the_json_400_and_rearms_for_pipelined_requests():
    conn = FakeConnection()
    guard, closes = guard_of(conn)
    guard.bad_request()
    assert closes == ["bad_request"] and json_body(conn.answers[0]) == {"error": "invalid HTTP request",
                                                                         "error_type": "InputError"}  # fmt: skip
    kept = FakeConnection()
    guard, _ = guard_of(kept)
    guard.received(b"GET /live HTTP/1.1\r\n\r\n")
    kept.awaiting, kept.pipelined = True, True  # the answer is out; part of the next request came with it
    guard.response_completed()
    assert len(kept.timers) == 1 and not kept.timers[0].cancelled
    guard.lost()
    assert kept.timers[0].cancelled


class FakeTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.written = b""
        self.closed = self.aborted = False

    def write(self, data) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _answer_ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_the_seam_works_against_the_installed_uvicorn():
    # Every uvicorn internal the guard relies on goes through H11Connection: this fails on an upgrade that moves one.
    from uvicorn.server import ServerState

    async def scenario():
        closes: list[str] = []
        protocol_class = guarded_protocol(10, 4, 30, on_close=closes.append)
        config = uvicorn.Config(_answer_ok, log_config=None, lifespan="off")
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={},
                                  _loop=asyncio.get_running_loop())  # fmt: skip
        transport = FakeTransport()
        protocol.connection_made(transport)
        seam = H11Connection(protocol)
        assert seam.open_connections() == 1 and seam.awaiting_headers() and not seam.closing()
        protocol.data_received(b"GET /live HTTP/1.1\r\nhost: t\r\n\r\nGET /li")
        assert not seam.awaiting_headers()  # a request's headers are in
        await eventually_async(lambda: transport.written.endswith(b"ok"), what="the app's answer written")
        assert transport.written.startswith(b"HTTP/1.1 200") and transport.written.endswith(b"ok")
        assert seam.has_pipelined_bytes() and seam.awaiting_headers()  # the next request's first bytes wait
        fired = asyncio.Event()
        seam.later(0.01, fired.set)
        await asyncio.wait_for(fired.wait(), 5)
        seam.answer_and_close(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        assert transport.written.endswith(b"408 Request Timeout\r\n\r\n") and transport.closed and seam.closing()
        protocol.connection_lost(None)
        assert seam.open_connections() == 0 and not closes

    asyncio.run(scenario())
