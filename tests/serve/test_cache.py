"""The server's embedding cache, over real HTTP: a repeat is answered without the engine, with the same vectors."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from live_server import (
    bearer,
    live_server,
    make_app,
    metric,
    wait_healthy,
)

from esm2cli.config import EmbedConfig
from esm2cli.serve.cache import OPEN_PARTITION, CacheStats, EmbeddingCache, cache_identity

A, B, C = "MKTAYIAKQRQISFVKSHFSRQ", "MSTNPKPQRKTKRNTNRRPQDVKFPGG", "MDSKGSSQKGSRLLLLLVVSNLLLCQGVVS"


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


KEY_A = "k-alpha-0123456789abcdef"
KEY_B = "k-bravo-fedcba9876543210"


def cache_lines(client: httpx.Client, key: str) -> list[str]:
    """The cache's samples in /metrics as the holder of ``key`` sees them."""
    text = client.get("/metrics", headers=bearer(key)).text
    return [line for line in text.splitlines() if line.startswith("esm2cli_cache_") and not line.startswith("#")]


def test_each_api_key_has_its_own_partition_and_sees_only_its_own_counts(tiny_model_dir):
    # cache_size=2 a key: B filling its own partition must not evict A's entries either.
    app = make_app(tiny_model_dir, api_keys=(KEY_A, KEY_B), cache_size=2, max_wait_ms=1)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)

        def ask(key: str, seq: str) -> np.ndarray:
            response = client.post("/predict", json={"sequence": seq}, headers=bearer(key))
            assert response.status_code == 200, response.text
            return np.array(response.json()["embedding"], np.float32)

        def engine_batches() -> float:
            return metric(client, "esm2cli_batch_size_count", bearer(KEY_A))

        first = ask(KEY_A, A)
        ran = engine_batches()
        assert ask(KEY_A, A).tobytes() == first.tobytes() and engine_batches() == ran  # A's repeat: A's hit
        seen_by_a = cache_lines(client, KEY_A)
        assert metric(client, "esm2cli_cache_hits_total", bearer(KEY_A)) == 1
        assert metric(client, "esm2cli_cache_misses_total", bearer(KEY_A)) == 1
        assert ask(KEY_B, A).tobytes() == first.tobytes() and engine_batches() == ran + 1  # B computes its own
        assert ask(KEY_B, A).tobytes() == first.tobytes() and engine_batches() == ran + 1  # then hits its own
        for seq in (B, C):  # B fills its partition (2 entries): its A leaves, A's A stays
            ask(KEY_B, seq)
        assert engine_batches() == ran + 3
        # The holder of key A learns nothing of B's traffic from the cache's counts.
        assert cache_lines(client, KEY_A) == seen_by_a
        assert metric(client, "esm2cli_cache_hits_total", bearer(KEY_B)) == 1
        assert metric(client, "esm2cli_cache_misses_total", bearer(KEY_B)) == 3
        assert metric(client, "esm2cli_cache_entries", bearer(KEY_B)) == 2
        ask(KEY_A, A)
        assert engine_batches() == ran + 3  # A's entry was not evicted by B's
        ask(KEY_B, A)
        assert engine_batches() == ran + 4  # B's was, by B's own


def test_the_entries_of_one_partition_are_not_another_s():
    cache = EmbeddingCache(4, cache_identity(weights="m", dtype="float32", embed=EmbedConfig(), model_family="esm2"))
    cache.put(b"a", A, {6: np.ones(4, np.float32)})
    assert cache.get(b"a", A) is not None and cache.get(b"b", A) is None and cache.get(OPEN_PARTITION, A) is None
    assert cache.stats(b"a") == CacheStats(hits=1, misses=0, entries=1)
    assert cache.stats(b"b") == CacheStats(hits=0, misses=1, entries=0)
    assert cache.stats(b"never") == CacheStats()


def test_a_stored_row_is_a_copy():
    cache = EmbeddingCache(4, cache_identity(weights="m", dtype="float32", embed=EmbedConfig(), model_family="esm2"))
    vector = {6: np.ones(4, np.float32)}
    cache.put(OPEN_PARTITION, A, vector)
    vector[6][0] = 5  # a row handed in is copied, not kept by reference
    assert cache.get(OPEN_PARTITION, A)[6][0] == 1


WINDOWED = EmbedConfig(truncate=50, long_sequences="window", window_overlap=10)


@pytest.mark.parametrize(
    "other",
    [
        EmbedConfig(truncate=60, long_sequences="window", window_overlap=10),  # truncate only: other windows
        EmbedConfig(truncate=50, long_sequences="window", window_overlap=20),
        EmbedConfig(truncate=50, long_sequences="truncate", window_overlap=10),
        EmbedConfig(truncate=50, long_sequences="window", window_overlap=10, pooling="bos"),
        EmbedConfig(truncate=50, long_sequences="window", window_overlap=10, layers=(0, -1)),
    ],
    ids=["truncate", "window_overlap", "long_sequences", "pooling", "layers"],
)
def test_settings_that_change_the_numbers_never_share_an_entry(other):
    # A protein of 300 residues is keyed whole in window mode: only the identity tells 50-wide windows from 60.
    seq = (A * 20)[:300]
    ours, theirs = (
        EmbeddingCache(4, cache_identity(weights="m", dtype="float32", embed=e, model_family="esm2"))
        for e in (WINDOWED, other)
    )
    assert ours.key(seq) != theirs.key(seq)
    ours.put(OPEN_PARTITION, seq, {6: np.ones(4, np.float32)})
    assert theirs.get(OPEN_PARTITION, seq) is None


def test_the_weights_the_dtype_and_the_model_family_are_in_the_identity():
    key = cache_identity(weights="sha256:00", dtype="float32", embed=EmbedConfig(), model_family="esm2")
    assert key != cache_identity(weights="sha256:01", dtype="float32", embed=EmbedConfig(), model_family="esm2")
    assert key != cache_identity(weights="sha256:00", dtype="bfloat16", embed=EmbedConfig(), model_family="esm2")
    assert key == cache_identity(
        weights="sha256:00", dtype="float32", embed=EmbedConfig(), model_family="esm2"
    )  # the control
    assert key != cache_identity(weights="sha256:00", dtype="float32", embed=EmbedConfig(), model_family="esmc")


def test_two_servers_differing_only_in_truncate_never_share_an_entry(tiny_model_dir):
    # The key a running server's cache uses comes from the identity of what it loaded and of its own options.
    import asyncio

    from esm2cli.config import ModelConfig, ServeConfig
    from esm2cli.serve.metrics import ServerMetrics
    from esm2cli.serve.service import EmbeddingService

    seq = (A * 20)[:300]
    model = ModelConfig(model=tiny_model_dir, devices="cpu", dtype="float32")

    async def key_of(embed: EmbedConfig) -> bytes:
        service = EmbeddingService(ServeConfig(), model, embed, metrics=ServerMetrics())
        await service.load()
        try:
            return service.cache.key(seq)
        finally:
            await service.stop()

    keys = [asyncio.run(key_of(WINDOWED)), asyncio.run(key_of(WINDOWED)),
            asyncio.run(key_of(EmbedConfig(truncate=60, long_sequences="window", window_overlap=10)))]  # fmt: skip
    assert keys[0] == keys[1] and keys[0] != keys[2]


def test_v1_embeddings_keeps_each_key_in_its_own_partition(tiny_model_dir):
    # The second route into the cache: OpenAI's /v1/embeddings must partition by key as /predict does.
    app = make_app(tiny_model_dir, api_keys=(KEY_A, KEY_B), cache_size=2, max_wait_ms=1)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        model = client.get("/v1/models", headers=bearer(KEY_A)).json()["data"][0]["id"]

        def ask(key: str, seq: str) -> list[float]:
            response = client.post("/v1/embeddings", json={"input": seq, "model": model}, headers=bearer(key))
            assert response.status_code == 200, response.text
            return response.json()["data"][0]["embedding"]

        def engine_batches() -> float:
            return metric(client, "esm2cli_batch_size_count", bearer(KEY_A))

        first = ask(KEY_A, A)
        ran = engine_batches()
        assert ask(KEY_A, A) == first and engine_batches() == ran  # A's repeat: A's own hit
        assert ask(KEY_B, A) == first and engine_batches() == ran + 1  # B never reads A's entry
        assert metric(client, "esm2cli_cache_hits_total", bearer(KEY_B)) == 0
        assert metric(client, "esm2cli_cache_misses_total", bearer(KEY_B)) == 1
        assert metric(client, "esm2cli_cache_hits_total", bearer(KEY_A)) == 1
