"""The server's embedding cache, over real HTTP: a repeat is answered without the engine, with the same vectors."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from live_server import live_server, make_app, wait_healthy

from esm2cli.config import EmbedConfig
from esm2cli.serve.cache import EmbeddingCache
from reference import DirectReference

A, B, C = "MKTAYIAKQRQISFVKSHFSRQ", "MSTNPKPQRKTKRNTNRRPQDVKFPGG", "MDSKGSSQKGSRLLLLLVVSNLLLCQGVVS"


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    return DirectReference(tiny_model_dir)


def metric(client: httpx.Client, name: str) -> float:
    """A sample's value in /metrics (0 when absent)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def batches(client: httpx.Client) -> float:
    return metric(client, "esm2cli_batch_size_count")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app = make_app(tiny_model_dir, cache_size=2, public_metrics=True, max_wait_ms=1)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        yield client


def embed_one(client: httpx.Client, seq: str) -> np.ndarray:
    response = client.post("/predict", json={"sequence": seq})
    assert response.status_code == 200, response.text
    return np.array(response.json()["embedding"], np.float32)


def test_a_repeat_is_a_hit_with_the_same_answer_and_no_engine_batch(server, direct):
    hits, misses = metric(server, "esm2cli_cache_hits_total"), metric(server, "esm2cli_cache_misses_total")
    first = embed_one(server, A)
    ran = batches(server)
    assert metric(server, "esm2cli_cache_misses_total") == misses + 1
    again = embed_one(server, A.lower())  # normalised first: the same sequence
    assert again.tobytes() == first.tobytes()
    np.testing.assert_allclose(again, direct.mean(A), rtol=1e-4, atol=1e-5)
    assert metric(server, "esm2cli_cache_hits_total") == hits + 1
    assert batches(server) == ran  # the engine did not run


def test_a_batch_mixes_hits_and_misses_in_order(server, direct):
    embed_one(server, B)
    hits, ran = metric(server, "esm2cli_cache_hits_total"), batches(server)
    response = server.post("/predict/batch", json={"sequences": [B, C, B]})
    assert response.status_code == 200
    got = np.array([r["embedding"] for r in response.json()["results"]], np.float32)
    np.testing.assert_allclose(got, np.stack([direct.mean(s) for s in (B, C, B)]), rtol=1e-4, atol=1e-5)
    assert metric(server, "esm2cli_cache_hits_total") == hits + 2
    assert batches(server) == ran + 1  # C alone went to the engine


def test_the_least_recently_used_entry_leaves_first(server):
    for seq in (A, B, C):  # room for two: A leaves
        embed_one(server, seq)
    assert metric(server, "esm2cli_cache_entries") == 2
    ran = batches(server)
    embed_one(server, C)
    assert batches(server) == ran
    embed_one(server, A)
    assert batches(server) == ran + 1


def test_cache_size_zero_turns_it_off(tiny_model_dir):
    app = make_app(tiny_model_dir, cache_size=0, public_metrics=True, max_wait_ms=1)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        first = embed_one(client, A)
        ran = batches(client)
        np.testing.assert_allclose(embed_one(client, A), first, rtol=0, atol=1e-6)
        assert batches(client) == ran + 1
        assert metric(client, "esm2cli_cache_hits_total") == 0 == metric(client, "esm2cli_cache_misses_total")


def test_the_key_includes_the_options():
    vector = {6: np.ones(4, np.float32)}
    mean, bos = EmbeddingCache(4, EmbedConfig(), "m"), EmbeddingCache(4, EmbedConfig(pooling="bos"), "m")
    mean.put(A, vector)
    assert mean.get(A) is not None and mean._key(A) != bos._key(A)
    stored = mean.get(A)[6]
    vector[6][0] = 5  # a row handed in is copied, not kept by reference
    assert stored[0] == 1
