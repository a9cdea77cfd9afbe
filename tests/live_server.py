"""A real uvicorn server on a loopback port, in a thread of the test process, and the apps it serves."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig
from esm2cli.runtime.engine import build_engine
from esm2cli.serve.app import create_app


def serve_process(args: list[str], log_path, timeout: float = 120, **popen) -> tuple[subprocess.Popen, int]:
    """Starts ``python -m esm2cli serve ARGS --port 0``, its stderr into ``log_path`` (a file: a full pipe would
    block the server); returns the process and the port it bound, read from its startup line (no free-then-bind
    race). The caller kills the process in ``finally``."""
    log = open(log_path, "w")  # noqa: SIM115 - the process writes it until it exits
    proc = subprocess.Popen([sys.executable, "-m", "esm2cli", "serve", *args, "--port", "0"], stderr=log, **popen)
    log.close()
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(r"Uvicorn running on http://[^:]+:(\d+)", Path(log_path).read_text())
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"esm2cli serve exited {proc.returncode}: {Path(log_path).read_text()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("esm2cli serve did not report its port")


@contextmanager
def live_server(app, port: int | None = None):
    """Serves ``app`` on 127.0.0.1 until the block ends, as esm2cli serve does; yields its base URL."""
    from esm2cli.serve.connections import uvicorn_config

    # Port 0: the kernel picks a free port at bind time, read back below (no free-then-bind race).
    server = uvicorn.Server(uvicorn_config(app, app.state.serve, host="127.0.0.1", port=port or 0, lifespan="on"))
    app.state.test_server = server  # what open_connections() reads
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def open_connections(app) -> int:
    """The connections the live server of ``app`` holds open now, as its connection cap counts them."""
    return len(app.state.test_server.server_state.connections)


def wait_healthy(client, timeout: float = 60) -> dict:
    """Polls /health until 200; a refused connection (a server process still starting) is waited out too."""
    import httpx

    deadline = time.time() + timeout
    last = "no answer"
    while time.time() < deadline:
        try:
            response = client.get("/health")
        except httpx.TransportError as exc:
            last = repr(exc)
        else:
            if response.status_code == 200:
                return response.json()
            last = f"{response.status_code} {response.text}"
        time.sleep(0.05)
    raise AssertionError(f"never healthy: {last}")


def make_app(model_dir, loader_wrap=None, embed=None, **serve):
    """The server's app on a model directory, float32 on the CPU; ``serve`` holds ServeConfig fields (and devices)."""
    model = ModelConfig(model=model_dir, devices=serve.pop("devices", "cpu"), dtype="float32")
    embed = embed or EmbedConfig()

    def loader():
        setup = build_engine(model, embed)
        return loader_wrap(setup) if loader_wrap else setup

    return create_app(ServeConfig(**serve), model, embed, loader=loader)


def slow_replicas(delay: float):
    """A loader_wrap that makes every engine batch take ``delay`` seconds more."""

    def wrap(setup):
        for worker in setup.engine._workers:
            original = worker.replica.embed_batch

            def slow(seqs, original=original):
                time.sleep(delay)
                return original(seqs)

            worker.replica.embed_batch = slow
        return setup

    return wrap


def raw_exchange(url: str, data: bytes, timeout: float = 10) -> bytes:
    """Sends raw bytes on a new connection; returns everything the server sends until it closes (or timeout)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def metric(client, name: str, headers: dict | None = None) -> float:
    """The value of one sample of /metrics, by its full name with labels (0 when absent)."""
    for line in client.get("/metrics", headers=headers).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def bearer(key: str) -> dict:
    """The header that carries an API key."""
    return {"authorization": f"Bearer {key}"}


def status_of(raw: bytes) -> int:
    """The status of a raw HTTP/1.1 answer (0 when it is not one)."""
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def json_body(raw: bytes) -> dict:
    """The JSON body of a raw HTTP answer."""
    import json

    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


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
    deadline = time.time() + timeout
    while metric(client, "esm2cli_pending_sequences") != want:
        if waiting_on.done():
            raise AssertionError(f"answered before it was pending: {waiting_on.result().status_code}")
        assert time.time() < deadline, f"pending never reached {want}"
        time.sleep(0.01)


# The settings of the live servers several test modules start (each module its own: a fixture per module).
# No cache: those tests measure the engine (batches, busy time), and some send the same sequences.
PLAIN = dict(devices="sim:2", max_body_bytes=64 * 1024, truncation=False, max_wait_ms=2, cache_size=0)
GUARDED = dict(max_wait_ms=1, header_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=64 * 1024)  # short timeouts


@contextmanager
def serving(model_dir, **serve):
    """A healthy live server of make_app(model_dir, **serve) until the block ends; yields (url, client)."""
    with live_server(make_app(model_dir, **serve)) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        yield url, client
