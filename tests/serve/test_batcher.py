"""The dynamic batcher: coalescing, the queue bound at its exact value, and its slots, given back on every path."""

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from live_server import (
    Gate,
    live_server,
    make_app,
    metric,
    slow_replicas,
    wait_healthy,
    wait_pending,
)

from esm2cli.errors import EngineError
from esm2cli.io.schema import Embeddings
from esm2cli.serve.batcher import DynamicBatcher, Slots
from reference import cosine


def test_full_queue_answers_429_at_once_with_retry_after(tiny_model_dir):
    # One sequence, repeated: without cache_size=0 a request arriving after the first answer is a cache hit.
    app = make_app(tiny_model_dir, loader_wrap=slow_replicas(0.5), max_queue=4, batching=False, cache_size=0)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_healthy(client)

        def one(_):
            with httpx.Client(base_url=url, timeout=30) as own:
                start = time.perf_counter()
                r = own.post("/predict", json={"sequence": "MKVLA"})
                return r.status_code, r.headers.get("retry-after"), time.perf_counter() - start

        with ThreadPoolExecutor(12) as executor:
            results = list(executor.map(one, range(12)))
    refused = [r for r in results if r[0] == 429]
    accepted = [r for r in results if r[0] == 200]
    assert refused and all(r[1] == "1" for r in refused)
    # At once, not after queuing: each accepted request waited at least one 0.5 s batch (exact: test_server_limits).
    assert max(r[2] for r in refused) < min(r[2] for r in accepted), results
    assert {r[0] for r in results} == {200, 429}


def _batch_stats(client) -> tuple[float, float]:
    lines = client.get("/metrics").text.splitlines()
    count = next(float(x.split()[-1]) for x in lines if x.startswith("esm2cli_batch_size_count"))
    total = next(float(x.split()[-1]) for x in lines if x.startswith("esm2cli_batch_size_sum"))
    return count, total


@pytest.mark.parametrize("batching", [True, False])
def test_dynamic_batching_coalesces_concurrent_requests(tiny_model_dir, direct, batching):
    app = make_app(tiny_model_dir, loader_wrap=slow_replicas(0.3), batching=batching, max_wait_ms=50)
    seqs = [f"MKV{'A' * k}W" for k in range(12)]
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        before = _batch_stats(client)

        def one(seq):
            with httpx.Client(base_url=url, timeout=60) as own:
                return own.post("/predict", json={"sequence": seq}).json()["embedding"]

        with ThreadPoolExecutor(12) as executor:
            vectors = list(executor.map(one, seqs))
        count, total = (a - b for a, b in zip(_batch_stats(client), before, strict=True))
    assert total == 12
    if batching:
        assert count <= 4  # 12 requests in at most 4 engine batches
    else:
        assert count == 12
    for seq, vector in zip(seqs, vectors, strict=True):
        assert cosine(np.array(vector), direct.mean(seq)).min() >= 0.9999


def _engine_batches(app, seqs: list[str], clients: int) -> tuple[float, float]:
    """(engine batches, sequences in them) for ``clients`` concurrent single-sequence clients sending ``seqs``."""
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        before = _batch_stats(client)

        def one_client(share: list[str]) -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                for seq in share:
                    own.post("/predict", json={"sequence": seq}).raise_for_status()

        with ThreadPoolExecutor(clients) as executor:
            list(executor.map(one_client, [seqs[i::clients] for i in range(clients)]))
        count, total = (a - b for a, b in zip(_batch_stats(client), before, strict=True))
        return count, total


def test_batching_coalesces_clients_where_each_call_costs_a_fixed_time(tiny_model_dir):
    # A GPU runs a batch of 16 short sequences in about the time of one: model that with a fixed cost per
    # engine call. Then what batching gains is the ratio of engine calls, counted here; the throughput itself
    # moves with the machine's load and is measured side by side by benchmarks/serve_bench.py.
    seqs = [f"MKV{'A' * (k % 7)}W" for k in range(48)]
    slow = slow_replicas(0.08)  # 7 distinct sequences: without cache_size=0 the engine would hardly run
    (on, on_seqs), (off, off_seqs) = (
        _engine_batches(make_app(tiny_model_dir, loader_wrap=slow, batching=b, max_wait_ms=5, cache_size=0), seqs, 16)
        for b in (True, False)
    )
    assert on_seqs == off_seqs == 48
    assert off == 48  # one engine call a request
    assert off >= 3 * on, (on, off)  # 16 waiting clients share calls: at least 3 sequences a call


def test_exactly_max_queue_sequences_are_accepted(tiny_model_dir):
    gate = Gate()
    # One sequence, repeated: without cache_size=0 the cache would answer the repeats before they queue.
    app = make_app(tiny_model_dir, loader_wrap=gate, max_queue=4, batching=False, cache_size=0)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(2) as pool:
        wait_healthy(client)
        try:
            idle = client.post("/predict/batch", json={"sequences": ["MKV"] * 4})  # exactly max_queue, idle server
            assert idle.status_code == 200, idle.text
            # more than max_queue can never fit: 413 naming the limit, not a 429 clients would retry forever
            never = client.post("/predict/batch", json={"sequences": ["MKV"] * 5})
            assert never.status_code == 413 and "--max-queue 4" in never.text
            gate.hold()
            three = pool.submit(client.post, "/predict/batch", json={"sequences": ["MKV"] * 3})
            wait_pending(client, 3, three)
            refused = client.post("/predict/batch", json={"sequences": ["MKV"] * 2})  # 3 + 2 > 4
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            one = pool.submit(client.post, "/predict", json={"sequence": "MKV"})  # 3 + 1 = 4: accepted
            wait_pending(client, 4, one)
            assert client.post("/predict", json={"sequence": "MKV"}).status_code == 429  # 4 + 1 > 4
        finally:
            gate.release()
        assert three.result().status_code == 200 and one.result().status_code == 200
        assert metric(client, "esm2cli_pending_sequences") == 0


class FakeEngine:
    """Engine.submit's contract: a concurrent future per batch; the test decides when and how each ends."""

    def __init__(self, fail_submit: bool = False):
        self.fail_submit = fail_submit
        self.futures: list[Future] = []
        self.batches: list[list[str]] = []

    def submit(self, seqs: list[str]) -> Future:
        if self.fail_submit:
            raise EngineError("the engine refused the batch")
        self.batches.append(list(seqs))
        self.futures.append(Future())
        return self.futures[-1]

    def answer(self, k: int) -> None:
        seqs = self.batches[k]
        pooled = np.array([[len(s), sum(map(ord, s))] for s in seqs], np.float32)
        self.futures[k].set_result(Embeddings({0: pooled}, {}))


def make_batcher(engine: FakeEngine, **options) -> DynamicBatcher:
    settings = dict(max_batch=8, max_wait_s=0.001, max_tokens=1024, max_queue=16, max_in_flight=2)
    return DynamicBatcher(engine.submit, **{**settings, **options})


async def until(condition, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0.001)


def run_with(engine: FakeEngine, scenario, **options):
    async def main():
        batcher = make_batcher(engine, **options)
        batcher.start()
        try:
            return await scenario(batcher)
        finally:
            await asyncio.wait_for(batcher.stop(), 5)

    return asyncio.run(main())


def test_a_slot_is_given_back_once_answered():
    engine = FakeEngine()

    async def scenario(batcher):
        work = asyncio.ensure_future(batcher.embed(["MKV", "LLWA"]))
        await until(lambda: engine.futures)
        assert batcher.slots.held == 1
        engine.answer(0)
        rows = await work
        assert [row[0][0] for row in rows] == [3, 4]  # each request's rows, in its order
        await until(lambda: batcher.slots.held == 0)

    run_with(engine, scenario)


def test_a_slot_is_given_back_when_the_batch_fails_or_cannot_be_submitted():
    engine = FakeEngine()

    async def failing(batcher):
        work = asyncio.ensure_future(batcher.embed(["MKV"]))
        await until(lambda: engine.futures)
        engine.futures[0].set_exception(EngineError("a replica failed"))
        with pytest.raises(EngineError, match="a replica failed"):
            await work
        await until(lambda: batcher.slots.held == 0)

    run_with(engine, failing)

    async def refused(batcher):
        with pytest.raises(EngineError, match="refused"):
            await batcher.embed(["MKV"])
        await until(lambda: batcher.slots.held == 0)

    run_with(FakeEngine(fail_submit=True), refused)


def test_a_slot_is_given_back_when_every_request_in_the_batch_gives_up():
    engine = FakeEngine()

    async def scenario(batcher):
        work = asyncio.ensure_future(batcher.embed(["MKV"]))
        await until(lambda: engine.futures)
        work.cancel()  # the client left: the engine batch only it needed is cancelled before a replica takes it
        await until(lambda: engine.futures[0].cancelled())
        await until(lambda: batcher.slots.held == 0)
        assert batcher.pending == 0

    run_with(engine, scenario)


def test_a_slot_is_given_back_after_a_timeout_and_the_next_request_is_served():
    engine = FakeEngine()

    async def scenario(batcher):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.embed(["MKV"]), 0.05)
        await until(lambda: batcher.slots.held == 0)
        work = asyncio.ensure_future(batcher.embed(["LLW"]))
        await until(lambda: len(engine.futures) == 2)
        engine.answer(1)
        assert (await work)[0][0][0] == 3

    run_with(engine, scenario, max_in_flight=1)  # one slot: a leaked one would hang the second request


def test_slots_bound_the_batches_in_flight():
    engine = FakeEngine()

    async def scenario(batcher):
        works = [asyncio.ensure_future(batcher.embed([seq])) for seq in ("M", "MK", "MKV")]
        await until(lambda: len(engine.futures) == 2)
        await asyncio.sleep(0.05)
        assert len(engine.futures) == 2 and batcher.slots.held == 2  # the third waits for a free slot
        engine.answer(0)
        await until(lambda: len(engine.futures) == 3)
        engine.answer(1)
        engine.answer(2)
        await asyncio.gather(*works)
        await until(lambda: batcher.slots.held == 0)

    run_with(engine, scenario, coalesce=False)


def test_a_slot_gives_back_exactly_once_and_can_be_passed_on():
    async def scenario():
        slots = Slots(1)
        with pytest.raises(RuntimeError, match="inside"):
            async with await slots.take():
                assert slots.held == 1
                raise RuntimeError("inside")
        assert slots.held == 0
        slot = await slots.take()
        later = slot.pass_on()
        slot.release()  # passed on: gives back nothing
        assert slots.held == 1
        later.release()
        later.release()  # twice: once only
        assert slots.held == 0
        with pytest.raises(RuntimeError, match="given back already"):
            later.pass_on()
        await asyncio.wait_for(slots.take(), 1)  # the place is free again

    asyncio.run(scenario())
