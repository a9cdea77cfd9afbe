"""The app over real HTTP on loopback: readiness, answers against independent computations, validation
and error shapes, routes, and generated requests from its own OpenAPI schema."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from live_server import (
    live_server,
    make_app,
    wait_healthy,
)

from esm2cli.cli import cli
from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig
from esm2cli.serve.app import create_app
from helpers import random_protein
from reference import cosine


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
    fa = tmp_path / "in.fa"
    fa.write_text("".join(f">{rec_id}\n{seq}\n" for rec_id, seq in records))
    result = CliRunner().invoke(cli, ["embed", str(fa), "-o", str(out), "-m", tiny_model_dir])
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


def test_several_layers_answer_by_layer(tiny_model_dir, direct):
    app = make_app(tiny_model_dir, embed=EmbedConfig(layers=(0, -1)))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_healthy(client)
        body = client.post("/predict", json={"sequence": "MKVLAW"}).json()
    assert body["embedding"] is None and sorted(body["embeddings"]) == ["l0", "l3"]
    assert cosine(np.array(body["embeddings"]["l0"]), direct.mean("MKVLAW", 0)).min() >= 0.9999


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


def test_a_utf16_body_is_422_as_documented(tiny_model_dir):
    app = make_app(tiny_model_dir, max_wait_ms=1)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        body = '{"sequence": "MKTAYIAKQR"}'.encode("utf-16")  # a BOM, then UTF-16-LE
        answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert "UTF-8" in answer.json()["error"]


def test_serve_with_truncate_over_the_model_positions_never_answers_500(tiny_model_dir):
    app = make_app(tiny_model_dir, embed=EmbedConfig(truncate=2000), max_wait_ms=1)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        answer = client.post("/predict", json={"sequence": random_protein(1500)})
        # a configuration problem is the operator's (refuse to start) or the request's (422), never a 500
        assert answer.status_code in (200, 422), answer.text
