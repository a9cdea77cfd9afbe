"""Property-based requests generated from the server's own OpenAPI schema: no input gives a 500."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from live_server import live_server, wait_healthy

from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig
from esm2cli.serve.app import create_app


@pytest.fixture(scope="module")
def api_url(tiny_model_dir):
    app = create_app(
        ServeConfig(max_wait_ms=1), ModelConfig(model=tiny_model_dir, devices="cpu", dtype="float32"), EmbedConfig()
    )
    with live_server(app) as url, httpx.Client(base_url=url) as client:
        wait_healthy(client)
        yield url


@pytest.fixture(scope="module")
def api_schema(api_url):
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


# schemathesis's own pytest plugin does not run under pytest 9, so its strategies drive Hypothesis directly.
OPERATIONS = [
    ("/predict", "POST"),
    ("/predict/batch", "POST"),
    ("/v1/embeddings", "POST"),
    ("/health", "GET"),
    ("/live", "GET"),
]


@pytest.mark.parametrize("path, method", OPERATIONS)
def test_no_generated_request_gets_a_server_error(api_schema, path, method):
    seen = []

    @given(case=api_schema[path][method].as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call()
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        if response.status_code == 422:
            assert response.json()["error"]

    check()
    assert seen
