"""EmbeddingService: readiness, checks, the cache, and the race of the answer against the client leaving and the
timeout, driven directly (no app, no socket) and over HTTP."""

import asyncio
import json
import logging
import socket
import threading
import time
import weakref
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from live_server import (
    Gate,
    live_server,
    make_app,
    metric,
    slow_replicas,
    wait_healthy,
)

from esm2cli.api import Embedder
from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig
from esm2cli.errors import ClientDisconnectedError, InputError, ModelLoadError, NotReadyError, RequestTimeoutError
from esm2cli.runtime.engine import build_engine
from esm2cli.runtime.windows import window_starts
from esm2cli.serve.metrics import ServerMetrics
from esm2cli.serve.service import EmbeddingService, SequenceIn
from helpers import eventually, eventually_async
from reference import cosine


def test_a_request_that_can_never_fit_the_queue_is_413_naming_the_limit(tiny_model_dir):
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
        # until the queue is full: 32 requests accepted, the rest answered 429
        eventually(lambda: metric(client, "esm2cli_pending_sequences") >= 2048, what="a full queue")
        assert metric(client, "esm2cli_pending_sequences") == 2048
        for sock in socks:
            sock.close()
        closed = time.perf_counter()
        eventually(lambda: metric(client, "esm2cli_pending_sequences") == 0, what="an empty queue")
        freed = time.perf_counter() - closed
        start = time.perf_counter()
        answer = client.post("/predict", json={"sequence": long_seq})
        served = time.perf_counter() - start
        assert answer.status_code == 200
        gone = metric(client, 'esm2cli_requests_total{endpoint="/predict/batch",status="499"}')
        refused = metric(client, 'esm2cli_requests_total{endpoint="/predict/batch",status="429"}')
        batches = metric(client, "esm2cli_batch_size_count")
    print(f"queue freed in {freed:.3f} s; next request {served:.3f} s (alone: {alone:.3f} s); {batches:.0f} batches")
    # That the queue emptied by dropping, not by computing (> 100 s), the batch count shows, not a clock:
    # of the 2,048 accepted sequences, only those already at a replica ran.
    assert batches < 200 + 1
    # Against the same request on the idle server: one still stuck behind the queue's work waits for
    # hundreds of its like; a factor of 10 absorbs a loaded machine.
    assert served < 10 * alone, f"the next request took {served:.2f} s, {alone:.2f} s on an idle server"
    assert gone == 32 and refused == 28


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


def make_service(model_dir, *, wrap=None, embed: EmbedConfig | None = None, **serve) -> EmbeddingService:
    """A service on the tiny model, float32 on the CPU, with no app around it."""
    model = ModelConfig(model=model_dir, devices="cpu", dtype="float32")
    embed = embed or EmbedConfig()

    def loader():
        setup = build_engine(model, embed)
        return wrap(setup) if wrap else setup

    return EmbeddingService(ServeConfig(**serve), model, embed, metrics=ServerMetrics(), loader=loader)


async def never() -> None:
    """A client that never leaves."""
    await asyncio.Event().wait()


def _count(service: EmbeddingService) -> float:
    """Engine batches run so far, as /metrics shows them."""
    text = service.metrics.render().decode()
    return next(float(x.split()[-1]) for x in text.splitlines() if x.startswith("esm2cli_batch_size_count"))


def test_readiness_from_loading_to_ok(tiny_model_dir, direct):
    async def scenario():
        service = make_service(tiny_model_dir, max_wait_ms=1)
        body, status = service.health()
        assert status == 503 and body["status"] == "loading" and body["model"] == Path(tiny_model_dir).name
        assert service.live() == ({"status": "alive"}, 200)  # loading is alive: liveness must not kill it
        with pytest.raises(NotReadyError, match="still loading"):
            await service.embed([("MKV", None)], ["sequence"], disconnected=never)
        await service.load()
        try:
            body, status = service.health()
            assert status == 200 and body["status"] == "ok" and body["devices"] == ["cpu"]
            ((length, row),) = await service.embed([("mkv", "p")], ["sequence"], disconnected=never)
            assert length == 3 and set(row) == {3}
        finally:
            await service.stop()
        return row[3]

    assert cosine(asyncio.run(scenario()), direct.mean("MKV")).min() >= 0.9999


@pytest.mark.parametrize("error, traceback", [(ModelLoadError("no such model directory: x"), False),
                                              (RuntimeError("a bug in loading"), True)])  # fmt: skip
def test_a_failed_load_is_dead_and_only_a_bug_keeps_its_traceback(tiny_model_dir, caplog, error, traceback):
    failures = []

    def broken():
        raise error

    model = ModelConfig(model=tiny_model_dir, devices="cpu", dtype="float32")
    service = EmbeddingService(ServeConfig(), model, EmbedConfig(), metrics=ServerMetrics(), loader=broken,
                               on_load_failure=failures.append)  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="esm2cli.serve.service"):
        asyncio.run(service.load())
    assert failures == [error] and service.status == "failed"
    assert service.live() == ({"status": "dead"}, 503) and service.health()[1] == 503
    (record,) = [r for r in caplog.records if r.name == "esm2cli.serve.service"]
    assert (record.exc_info is not None) is traceback
    with pytest.raises(NotReadyError, match="failed to load"):
        service.ready()


def test_a_repeat_is_answered_from_its_own_client_s_cache_only(tiny_model_dir):
    async def scenario():
        service = make_service(tiny_model_dir, max_wait_ms=1, cache_size=8)
        await service.load()
        try:
            ((_, first),) = await service.embed([("MKVLAW", None)], ["s"], client=b"a", disconnected=never)
            ran = _count(service)
            ((_, again),) = await service.embed([("MKVLAW", None)], ["s"], client=b"a", disconnected=never)
            assert _count(service) == ran and again[3].tobytes() == first[3].tobytes()
            await service.embed([("MKVLAW", None)], ["s"], client=b"b", disconnected=never)
            assert _count(service) == ran + 1  # another client's entry is not this one's
        finally:
            await service.stop()

    asyncio.run(scenario())


def test_a_client_that_leaves_frees_the_queue_and_caches_nothing(tiny_model_dir):
    gate = Gate()

    async def scenario():
        service = make_service(tiny_model_dir, wrap=gate, max_wait_ms=1, cache_size=8)
        await service.load()
        gone = asyncio.Event()
        try:
            gate.hold()
            work = asyncio.ensure_future(service.embed([("MKV", None), ("LLW", None)], ["a", "b"],
                                                       disconnected=gone.wait))  # fmt: skip
            await eventually_async(lambda: service.batcher.pending == 2, what="both sequences pending")
            gone.set()
            with pytest.raises(ClientDisconnectedError, match="closed the connection"):
                await work
            assert service.batcher.pending == 0
        finally:
            gate.release()
            await service.stop()
        return service.cache.stats(b"")

    stats = asyncio.run(scenario())
    assert stats.entries == 0


def test_an_answer_later_than_the_timeout_is_a_timeout_and_frees_the_queue(tiny_model_dir):
    gate = Gate()

    async def scenario():
        service = make_service(tiny_model_dir, wrap=gate, max_wait_ms=1, request_timeout_s=0.2)
        await service.load()
        try:
            gate.hold()
            with pytest.raises(RequestTimeoutError, match="not answered within 0.2 s"):
                await service.embed([("MKV", None)], ["sequence"], disconnected=never)
            assert service.batcher.pending == 0
        finally:
            gate.release()
            await service.stop()

    asyncio.run(scenario())


def test_checks_name_the_item_and_answers_say_how_a_protein_was_cut(tiny_model_dir):
    async def scenario():
        service = make_service(tiny_model_dir, max_wait_ms=1, embed=EmbedConfig(truncate=5, layers=(0, -1)))
        await service.load()
        try:
            with pytest.raises(InputError, match=r"sequences\[1\] \(id 'x'\): character\(s\) outside"):
                await service.embed([("MKV", None), ("MKJ", "x")], ["sequences[0]", "sequences[1] (id 'x')"],
                                    disconnected=never)  # fmt: skip
            item = SequenceIn(sequence="MKVLAWG", id="p")
            (answer,) = await service.embed_items([item], ["sequence"], disconnected=never)
        finally:
            await service.stop()
        return answer

    answer = asyncio.run(scenario())
    assert (answer.id, answer.length, answer.truncated, answer.windows) == ("p", 7, True, 1)
    assert answer.embedding is None and sorted(answer.embeddings) == ["l0", "l3"]


class _Tracked(np.ndarray):
    """A per-token array the test can see die (a plain ndarray takes no weak reference)."""


class WindowSpy:
    """A loader wrap: marks every per-token array the replicas give back, and records how many are alive
    whenever a batch starts (the windows a request still holds while later ones compute); keeps a copy of each
    by (layer, window sequence)."""

    def __init__(self):
        self.alive = self.peak = self.batches = 0
        self.copies: dict[tuple[int, str], np.ndarray] = {}
        self._lock = threading.Lock()  # arrays die in the worker's thread and in the event loop's

    def __call__(self, setup):
        for worker in setup.engine._workers:
            worker.replica.embed_batch = partial(self._embed_batch, worker.replica.embed_batch)
        return setup

    def _embed_batch(self, original, seqs, **options):
        with self._lock:
            self.peak, self.batches = max(self.peak, self.alive), self.batches + 1
        result = original(seqs, **options)
        for layer, arrays in result.per_token.items():
            self.copies.update(((layer, seq), array.copy()) for seq, array in zip(seqs, arrays, strict=True))
            result.per_token[layer] = [self._tracked(array) for array in arrays]
        return result

    def _tracked(self, array: np.ndarray) -> np.ndarray:
        view = array.view(_Tracked)
        with self._lock:
            self.alive += 1
        weakref.finalize(view, self._died)
        return view

    def _died(self) -> None:
        with self._lock:
            self.alive -= 1


def stitched_mean(protein: str, width: int, overlap: int, windows: dict[str, np.ndarray]) -> np.ndarray:
    """The mean of a protein stitched from its windows' per-token rows, as the server computed it with every window
    in hand: float64 sums in window order, each residue's mean cast to float32, their mean."""
    starts = window_starts(len(protein), width, overlap)
    total = np.zeros((len(protein), windows[protein[:width]].shape[1]))
    count = np.zeros(len(protein))
    for start in starts:
        total[start : start + width] += windows[protein[start : start + width]]
        count[start : start + width] += 1
    tokens = (total / count[:, None]).astype(np.float32)
    return np.asarray(tokens.mean(axis=0, dtype=np.float64), dtype=np.float32)


def test_a_long_protein_s_windows_are_stitched_as_they_arrive_into_embed_s_numbers(tiny_model_dir, proteins):
    # 1,250 residues in windows of 50 (stride 40): 31 windows, 2 a batch. Held until the request's end, every
    # window's per-token rows (one array a layer) were alive when the last batches ran; stitched as they come
    # back, only the batches in flight (two per replica) and the one running hold any.
    embed = EmbedConfig(truncate=50, long_sequences="window", window_overlap=10, layers=(0, -1))
    protein = "".join(seq for _, seq in proteins)[:1250]
    spy = WindowSpy()

    async def scenario():
        service = make_service(tiny_model_dir, wrap=spy, embed=embed, max_batch_size=2, max_wait_ms=1, cache_size=0)
        await service.load()
        try:
            spy.peak = spy.batches = 0  # the warm-up's batch is not the request's
            ((length, row),) = await service.embed([(protein, None)], ["sequence"], disconnected=never)
        finally:
            await service.stop()
        return length, row

    length, row = asyncio.run(scenario())
    windows = len(window_starts(len(protein), 50, 10))
    assert (length, windows, spy.batches) == (1250, 31, 16)
    assert spy.peak <= 3 * 2 * 2, f"{spy.peak} per-token arrays alive at once (of {windows} windows x 2 layers)"
    with Embedder(tiny_model_dir, long_sequences="window", truncate=50, window_overlap=10, layers=(0, -1),
                  devices="cpu", dtype="float32") as embedder:  # fmt: skip
        expected = embedder.embed([protein])
    assert sorted(row) == sorted(expected) == [0, 3]
    for layer, vectors in expected.items():
        assert row[layer].tobytes() == vectors[0].tobytes(), layer
        windows_of_layer = {seq: array for (at, seq), array in spy.copies.items() if at == layer}
        assert row[layer].tobytes() == stitched_mean(protein, 50, 10, windows_of_layer).tobytes(), layer
