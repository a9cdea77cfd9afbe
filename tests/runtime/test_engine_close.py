"""Engine.close while the queue is full: queued batches still run (or are cancelled with cancel=True), a
submit blocked on the full queue is answered, and nothing waits forever. Replicas are held on events."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from esm2cli.errors import EngineError
from esm2cli.runtime.engine import Engine
from helpers import FakeEmbedder


class Held(FakeEmbedder):
    """Signals when it has taken a batch, then waits for the gate."""

    def __init__(self, name, gate: threading.Event):
        super().__init__(name)
        self.gate = gate
        self.took = threading.Semaphore(0)

    def embed_batch(self, seqs):
        self.took.release()
        assert self.gate.wait(10), "the test never opened the gate"
        return super().embed_batch(seqs)


def full_engine(depth: int = 2):
    """A one-replica engine whose replica holds batch 'A' and whose queue is full of 'B's."""
    gate = threading.Event()
    replica = Held("sim:0", gate)
    engine = Engine([replica], queue_depth=depth).start()
    running = engine.submit(["A"])
    assert replica.took.acquire(timeout=5)
    queued = [engine.submit([f"B{i}"]) for i in range(depth)]
    return engine, replica, gate, running, queued


def blocked_submit(engine):
    """A submit on the full queue, in a thread; returns (thread, outcome)."""
    outcome: dict = {}

    def submit():
        try:
            outcome["future"] = engine.submit(["C"])
        except EngineError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=submit, daemon=True)
    thread.start()
    return thread, outcome


def test_close_while_the_queue_is_full_runs_what_was_queued():
    engine, replica, gate, running, queued = full_engine()
    closer = threading.Thread(target=engine.close, daemon=True)
    try:
        closer.start()
        closer.join(0.2)
        assert closer.is_alive()  # close waits for the queued batches; it does not drop them
        assert not engine.healthy
        with pytest.raises(EngineError, match="not running"):
            engine.submit(["late"])
    finally:
        gate.set()
    closer.join(10)
    assert not closer.is_alive(), "close never returned"
    assert running.result(timeout=5) and all(f.result(timeout=5) for f in queued)
    assert replica.seen == [["A"], ["B0"], ["B1"]]  # in order, each once


def test_a_submit_blocked_on_a_full_queue_is_answered_when_the_engine_closes():
    engine, replica, gate, running, queued = full_engine()
    thread, outcome = blocked_submit(engine)
    thread.join(0.2)
    assert thread.is_alive()  # blocked: the queue is full
    closer = threading.Thread(target=engine.close, daemon=True)
    closer.start()
    gate.set()
    closer.join(10)
    thread.join(10)
    assert not closer.is_alive() and not thread.is_alive(), "a waiter was left hanging"
    assert running.result(timeout=5) and all(f.result(timeout=5) for f in queued)
    # Whether C found room before the stop markers is a race; every outcome must be an answer, none a hang.
    assert settled(outcome) in ("ran", "refused: the workers stopped", "failed: every worker has stopped")


def settled(outcome: dict) -> str:
    if "error" in outcome:
        return "refused: the workers stopped" if "died: None" in str(outcome["error"]) else str(outcome["error"])
    try:
        outcome["future"].result(timeout=5)
    except EngineError as exc:
        return "failed: every worker has stopped" if "every worker has stopped" in str(exc) else str(exc)
    return "ran"


def test_close_with_cancel_on_a_full_queue_cancels_the_queued_batches():
    engine, replica, gate, running, queued = full_engine(depth=3)
    threading.Timer(0.1, gate.set).start()
    engine.close(cancel=True)
    assert running.result(timeout=5)
    for future in queued:
        with pytest.raises(CancelledError):
            future.result(timeout=5)
    assert replica.seen == [["A"]]
