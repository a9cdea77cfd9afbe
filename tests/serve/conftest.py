"""Fixtures of the server's tests: a reference computation and live servers on loopback (one per test module)."""

import httpx
import pytest
from live_server import live_server, make_app, wait_healthy

from reference import DirectReference


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    return DirectReference(tiny_model_dir)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """Two simulated replicas, 64 kB bodies, truncation off; no cache: tests measure the engine (batches, busy
    time), and some send the same sequences."""
    app = make_app(tiny_model_dir, devices="sim:2", max_body_bytes=64 * 1024, truncation=False, max_wait_ms=2,
                   cache_size=0)  # fmt: skip
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        yield client


@pytest.fixture(scope="module")
def guarded(tiny_model_dir):
    """Short header and body timeouts (0.5 s), 64 kB bodies; yields (url, client)."""
    app = make_app(tiny_model_dir, max_wait_ms=1, header_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=64 * 1024)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        yield url, client
