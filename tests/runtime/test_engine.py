import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from esm2cli.config import BatchConfig, EmbedConfig
from esm2cli.errors import BatchError, EngineError
from esm2cli.io.records import Record
from esm2cli.jobs.pipeline import embed_records
from esm2cli.runtime.engine import Engine
from helpers import FakeEmbedder


class MemoryWriter:
    def __init__(self):
        self.ids, self.lengths, self.truncated, self.vectors, self.chunks, self.discarded = [], [], [], [], [], []

    def discard(self, chunk):
        self.discarded.append(chunk)

    def write(self, chunk, rows):
        self.chunks.append((chunk.start, chunk.stop))
        self.ids += rows.ids
        self.lengths += rows.lengths
        self.truncated += rows.truncated
        self.vectors.append(rows.pooled[0])


def _records(lengths):
    return [Record(f"r{i}", "", "M" * n, i + 1) for i, n in enumerate(lengths)]


def test_equal_replicas_and_batches_share_the_work_in_turn():
    start = threading.Barrier(4)
    replicas = [FakeEmbedder(f"sim:{i}", delay=0.03, start=start) for i in range(4)]
    with Engine(replicas) as engine:
        futures = [engine.submit([f"B{i}"]) for i in range(12)]
        [f.result(timeout=10) for f in futures]
    counts = [len(r.seen) for r in replicas]
    assert sum(counts) == 12 and max(counts) - min(counts) <= 1, counts
    assert sorted(b[0] for r in replicas for b in r.seen) == sorted(f"B{i}" for i in range(12))


def test_pull_dispatch_keeps_the_idle_replica_busy_while_another_is_slow():
    # The slow replica holds the first batch it takes until the fast one has run every other batch. Pulled
    # from one queue, that happens; round-robin would leave half the batches queued behind the slow replica,
    # and its wait would run out instead.
    # The fast one starts only once the slow one holds a batch: on a loaded machine the slow worker's thread
    # could otherwise start after the fast one had pulled all twenty.
    others_done, slow_holds, waited, held = threading.Event(), threading.Event(), [], []

    class HoldsUntilTheOthersAreDone(FakeEmbedder):
        def embed_batch(self, seqs):
            start = time.perf_counter()
            if not waited:  # its first batch only: a broken dispatch costs one wait, not ten
                slow_holds.set()
                waited.append(others_done.wait(10))
            out = super().embed_batch(seqs)
            held.append(time.perf_counter() - start)
            return out

    class CountsDown(FakeEmbedder):
        def embed_batch(self, seqs):
            assert slow_holds.wait(10), "the slow replica never took a batch"
            out = super().embed_batch(seqs)
            if len(self.seen) == 19:
                others_done.set()
            return out

    slow, fast = HoldsUntilTheOthersAreDone("sim:0"), CountsDown("sim:1")
    start = time.perf_counter()
    with Engine([slow, fast]) as engine:
        futures = [engine.submit([f"B{i}"]) for i in range(20)]
        [f.result(timeout=20) for f in futures]
    wall = time.perf_counter() - start
    assert (len(slow.seen), len(fast.seen)) == (1, 19) and waited == [True], (len(slow.seen), waited)
    # Each worker counts the time its own replica held batches: the slow one's hold, the fast one's 19 batches.
    busy = engine.busy_seconds()
    assert held[0] <= busy["sim:0"] <= wall and 0 < busy["sim:1"] <= wall, (busy, held, wall)


def test_warm_up_runs_one_batch_on_every_replica():
    replicas = [FakeEmbedder(f"sim:{i}", delay=0.002 * i) for i in range(5)]
    with Engine(replicas) as engine:
        engine.warm_up(["MKV"])
    assert [r.seen for r in replicas] == [[["MKV"]]] * 5


def test_warm_up_reports_a_failing_replica_without_hanging():
    replicas = [FakeEmbedder("sim:0"), FakeEmbedder("sim:1", fail_on="MKV")]
    with Engine(replicas) as engine:
        with pytest.raises(BatchError, match="sim:1"):
            engine.warm_up(["MKV"])
        assert engine.submit(["GG"]).result(timeout=5)  # the engine still runs


@pytest.mark.parametrize("n_replicas", [1, 3, 8])
def test_order_is_restored(n_replicas):
    lengths = [((i * 37) % 101) + 1 for i in range(500)]
    replicas = [FakeEmbedder(f"sim:{i}", delay=0.001 * (i % 2)) for i in range(n_replicas)]
    writer = MemoryWriter()
    with Engine(replicas) as engine:
        summary = embed_records(
            _records(lengths),
            engine,
            writer,
            BatchConfig(batch_size=7, max_tokens=300, chunk_size=64),
            EmbedConfig(truncate=90),
        )
    vectors = np.concatenate(writer.vectors)
    assert writer.ids == [f"r{i}" for i in range(500)]
    assert writer.lengths == lengths
    assert writer.truncated == [n > 90 for n in lengths]
    assert vectors[:, 0].tolist() == [min(n, 90) for n in lengths]  # v[0] = len(seq): no order or padding mix-up
    assert summary.sequences == 500 and summary.residues == sum(min(n, 90) for n in lengths)
    assert writer.chunks == [(i, min(i + 64, 500)) for i in range(0, 500, 64)]  # 500 records, chunks of 64
    assert summary.truncated == sum(n > 90 for n in lengths)
    assert sum(len(b) for r in replicas for b in r.seen) == summary.sequences - summary.deduplicated


def test_a_failing_replica_fails_its_batch_not_the_others():
    start = threading.Barrier(2)
    replicas = [FakeEmbedder("sim:0", delay=0.02, start=start),
                FakeEmbedder("sim:1", delay=0.02, fail_on="BAD", start=start)]  # fmt: skip
    with Engine(replicas) as engine:
        futures = [engine.submit(["BAD"]) for _ in range(8)]  # sim:0 embeds it, sim:1 raises on it
        ok = engine.submit(["MK"])
        good = bad = 0
        for future in futures:
            try:
                assert future.result(timeout=5).pooled[0][0, 0] == 3
                good += 1
            except BatchError as exc:
                assert str(exc) == "a batch failed on sim:1: RuntimeError: boom on sim:1"
                assert isinstance(exc.__cause__, RuntimeError)
                bad += 1
        assert good == len(replicas[0].seen) >= 1 and bad == 8 - good >= 1
        assert ok.result(timeout=5)
        assert engine.healthy


def test_pipeline_surfaces_a_replica_error_without_hanging():
    replicas = [FakeEmbedder("sim:0", fail_on="M" * 50), FakeEmbedder("sim:1", fail_on="M" * 50)]  # either pulls it
    records = _records(list(range(1, 80)))  # distinct sequences: every one is computed
    result = {}

    def run():
        try:
            with Engine(replicas) as engine:
                embed_records(records, engine, MemoryWriter(), BatchConfig(batch_size=1, chunk_size=16), EmbedConfig())
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the run hung after a replica error"
    assert isinstance(result.get("error"), BatchError)


class DyingEmbedder(FakeEmbedder):
    def embed_batch(self, seqs):
        raise SystemExit("worker killed")  # not an Exception: kills the worker loop


def test_dead_worker_fails_waiters_and_next_submit():
    engine = Engine([DyingEmbedder("sim:0")], queue_depth=4).start()
    try:
        first = engine.submit(["A"])
        with pytest.raises(EngineError):
            first.result(timeout=5)
        deadline = time.time() + 5
        while engine.healthy and time.time() < deadline:
            time.sleep(0.01)
        assert not engine.healthy
        with pytest.raises(EngineError, match="died"):
            engine.submit(["B"])
    finally:
        engine.close()


def test_in_flight_work_is_bounded():
    gate, running = threading.Event(), threading.Semaphore(0)

    class Blocked(FakeEmbedder):
        def embed_batch(self, seqs):
            running.release()
            gate.wait(5)
            return super().embed_batch(seqs)

    engine = Engine([Blocked("sim:0"), Blocked("sim:1")], queue_depth=2).start()
    try:
        futures = [engine.submit(["A"]) for _ in range(2 + 4)]  # two running, four queued (2 per replica)
        assert running.acquire(timeout=5) and running.acquire(timeout=5)  # both replicas hold one: the queue is full
        blocked = threading.Thread(target=lambda: futures.append(engine.submit(["A"])))
        blocked.start()
        blocked.join(0.3)  # an accepted seventh batch returns at once; 0.3 s is the margin for a loaded machine
        assert blocked.is_alive(), "a seventh batch was accepted: nothing bounds the work in flight"
        gate.set()
        blocked.join(5)
        assert len(futures) == 7 and all(f.result(timeout=5) for f in futures)
    finally:
        gate.set()
        engine.close()


def test_a_dead_worker_leaves_the_queue_to_the_others_but_stops_new_work():
    class DiesOnX(FakeEmbedder):
        def embed_batch(self, seqs):
            if "X" in seqs:
                raise SystemExit("worker killed")
            return super().embed_batch(seqs)

    replicas = [DiesOnX("sim:0", delay=0.02), DiesOnX("sim:1", delay=0.02)]
    engine = Engine(replicas, queue_depth=4).start()
    try:
        doomed = engine.submit(["X"])
        rest = [engine.submit(["MK"]) for _ in range(5)]
        with pytest.raises(EngineError, match="died"):
            doomed.result(timeout=5)
        assert all(f.result(timeout=5) for f in rest)  # queued before the death: the survivor runs them
        assert not engine.healthy
        with pytest.raises(EngineError, match="died"):
            engine.submit(["MK"])
    finally:
        engine.close()


def test_close_with_cancel_skips_queued_work():
    gate, started = threading.Event(), threading.Event()

    class Slow(FakeEmbedder):
        def embed_batch(self, seqs):
            started.set()
            gate.wait(5)
            return super().embed_batch(seqs)

    replica = Slow("sim:0")
    engine = Engine([replica], queue_depth=3).start()
    running = engine.submit(["A"])
    assert started.wait(5)  # the replica holds A: the three B's are what is queued
    queued = [engine.submit(["B"]) for _ in range(3)]
    # A is let go once close() has cancelled the last B: if close() left them queued, the replica would wait out
    # its gate and run them.
    queued[-1].add_done_callback(lambda future: gate.set())
    engine.close(cancel=True)
    assert running.result(timeout=5)
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(timeout=5)
    assert replica.seen == [["A"]]


def test_submit_requires_a_started_engine():
    engine = Engine([FakeEmbedder("sim:0")])
    with pytest.raises(EngineError, match="not running"):
        engine.submit(["A"])


def test_identical_sequences_are_embedded_once_and_fill_every_row():
    seqs = ["MKV", "LLAW", "MKV", "G", "LLAW", "MKV"]
    records = [Record(f"r{i}", "", s, i + 1) for i, s in enumerate(seqs)]
    replica = FakeEmbedder("sim:0")
    writer = MemoryWriter()
    with Engine([replica]) as engine:
        summary = embed_records(records, engine, writer, BatchConfig(batch_size=64, max_tokens=1024), EmbedConfig())
    assert sorted(s for batch in replica.seen for s in batch) == ["G", "LLAW", "MKV"]
    vectors = np.concatenate(writer.vectors)
    assert writer.ids == [f"r{i}" for i in range(6)]
    assert vectors[:, 0].tolist() == [len(s) for s in seqs]
    assert summary.deduplicated == 3 and summary.sequences == 6


def test_dedup_uses_the_truncated_sequence():
    records = [Record("a", "", "MKVAAA", 1), Record("b", "", "MKVLLL", 2)]
    replica = FakeEmbedder("sim:0")
    writer = MemoryWriter()
    with Engine([replica]) as engine:
        embed_records(records, engine, writer, BatchConfig(max_tokens=1024), EmbedConfig(truncate=3))
    assert [s for batch in replica.seen for s in batch] == ["MKV"]
    assert writer.truncated == [True, True]


def test_finished_chunks_are_reused_only_when_their_records_hash_the_same():
    records = _records([5 + i for i in range(10)])
    batch = BatchConfig(max_tokens=1024, chunk_size=4)
    first = MemoryWriter()
    with Engine([FakeEmbedder("sim:0")]) as engine:
        done = embed_records(records, engine, first, batch, EmbedConfig()).chunks
    assert first.chunks == [(0, 4), (4, 8), (8, 10)]
    earlier = {done[0].start: done[0], done[2].start: done[2]}

    replica, writer = FakeEmbedder("sim:0"), MemoryWriter()
    with Engine([replica]) as engine:
        summary = embed_records(records, engine, writer, batch, EmbedConfig(), earlier=earlier)
    assert writer.chunks == [(4, 8)]
    assert writer.ids == ["r4", "r5", "r6", "r7"]
    assert sorted(len(s) for batch in replica.seen for s in batch) == [9, 10, 11, 12]
    assert summary.resumed == 6 and summary.sequences == 4 and summary.chunks == done

    edited = list(records)
    edited[9] = Record("r9", "", "M" * 13 + "A", 10)  # one residue of the last committed chunk changed
    replica, writer = FakeEmbedder("sim:0"), MemoryWriter()
    with Engine([replica]) as engine:
        summary = embed_records(edited, engine, writer, batch, EmbedConfig(), earlier=earlier)
    assert writer.discarded == [done[2]] and summary.recomputed == 1
    assert (8, 10) in writer.chunks and "M" * 13 + "A" in [s for b in replica.seen for s in b]
    assert summary.resumed == 4  # chunk 0 only


def test_new_chunks_stop_at_an_earlier_chunks_start():
    from esm2cli.io.chunks import Chunk

    records = _records([5] * 10)
    earlier = {6: Chunk(6, 8, "0" * 64)}  # whatever its hash, no new chunk may cover record 6
    writer = MemoryWriter()
    with Engine([FakeEmbedder("sim:0")]) as engine:
        summary = embed_records(records, engine, writer, BatchConfig(max_tokens=1024, chunk_size=5), EmbedConfig(),
                                earlier=earlier)  # fmt: skip
    assert [(c.start, c.stop) for c in summary.chunks] == [(0, 5), (5, 6), (6, 8), (8, 10)]
    assert summary.recomputed == 1 and writer.ids == [f"r{i}" for i in range(10)]


def test_chunks_close_after_about_commit_seconds_of_compute():
    from esm2cli.jobs.chunking import ChunkLimit

    limit = ChunkLimit(BatchConfig(chunk_size=10**6, commit_seconds=30.0))
    assert limit.full(1, 4096) and not limit.full(1, 4095)  # the first chunk, before any speed is known
    limit.observe(residues=10_000, seconds=2.0)  # 5,000 residues/s
    assert limit.residues == 150_000
    assert limit.full(10, 150_000) and not limit.full(10, 149_999)
    bounded = ChunkLimit(BatchConfig(chunk_bytes=1000), bytes_per_residue=10, bytes_per_record=0)
    assert bounded.full(1, 100) and not bounded.full(1, 99)


def test_cuda_replicas_capture_their_graphs_one_after_another():
    """Graph captures are never concurrent: torch allows one at a time in a process."""
    from esm2cli.runtime.engine import _capture_graphs

    spans: list[tuple[float, float, str]] = []

    class Capturing:
        graphs = object()  # a CUDA replica: it has a graph runner

        def __init__(self, name):
            self.name = name

        def warm_up(self):
            start = time.perf_counter()
            time.sleep(0.05)
            spans.append((start, time.perf_counter(), self.name))

    class CpuReplica:
        graphs = None

        def warm_up(self):
            raise AssertionError("a replica without graphs has nothing to capture")

    _capture_graphs([Capturing("cuda:0"), CpuReplica(), Capturing("cuda:1"), Capturing("cuda:2")])
    assert [name for _, _, name in spans] == ["cuda:0", "cuda:1", "cuda:2"]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
