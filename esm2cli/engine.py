"""The Engine: one worker thread per replica, round-robin dispatch, futures, bounded queues."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from esm2cli.config import EmbedConfig, ModelConfig
from esm2cli.errors import BatchError, EngineError, OverloadedError

log = logging.getLogger(__name__)

_STOP = object()
_PUT_POLL_S = 0.1  # how often a blocked submit re-checks that its worker is still alive


class Embedder(Protocol):
    """What the engine needs of a replica: a device with a name, and embed_batch."""

    device: Any

    def embed_batch(self, seqs: Sequence[str]) -> Any: ...


@dataclass
class _Job:
    seqs: Sequence[Any]
    method: str = "embed_batch"  # the replica method that runs the batch
    future: Future = field(default_factory=Future)
    options: dict = field(default_factory=dict)  # keyword arguments for embed_batch (per_token)


@dataclass
class _Worker:
    replica: Embedder
    jobs: queue.Queue
    alive: bool = True
    error: BaseException | None = None
    batches: int = 0
    busy_s: float = 0.0


@dataclass
class EngineSetup:
    """An engine ready to start, with what callers report about it."""

    engine: Engine
    model: Any  # esm2cli.model.LoadedModel
    layers: tuple[int, ...]
    devices: list[Any]  # esm2cli.devices.Device
    dtype: str  # the resolved dtype ("auto" decided)


def build_engine(model: ModelConfig, embed: EmbedConfig, queue_depth: int = 2, lm_head: bool = False) -> EngineSetup:
    """Resolves the devices and dtype, loads the model once and places one replica on each device.

    The contact head is loaded when ``embed.contacts`` asks for it, the masked-LM head when ``lm_head`` does.

    Raises:
        DeviceError, ConfigError, ModelLoadError: The devices, options or model are unusable.
    """
    # Imported here so that importing the engine does not import torch.
    from esm2cli.devices import resolve_devices, resolve_dtype
    from esm2cli.model import build_replicas, load_model, resolve_layers

    devices = resolve_devices(model.devices)
    dtype = resolve_dtype(model.dtype, devices)
    if dtype != model.dtype:
        log.info("--dtype auto: %s on %s", dtype, ", ".join(d.name for d in devices))
    loaded = load_model(replace(model, dtype=dtype), lm_head=lm_head, contact_head=embed.contacts)
    layers = resolve_layers(embed.layers, loaded.num_layers)
    replicas = build_replicas(loaded, devices, embed)
    return EngineSetup(Engine(replicas, queue_depth=queue_depth), loaded, layers, devices, dtype)


class Engine:
    """Runs batches on every replica in parallel and hands back futures.

    Batches go round-robin to the replicas. Each replica has a queue of at most ``queue_depth``
    waiting batches, so work in flight is bounded and ``submit`` blocks (or raises
    OverloadedError when ``block=False``) once every slot is taken.

    Use it as a context manager, or call start() and close().
    """

    def __init__(self, replicas: Sequence[Embedder], queue_depth: int = 2):
        if not replicas:
            raise ValueError("an Engine needs at least one replica; this is a bug")
        self._workers = [_Worker(r, queue.Queue(maxsize=queue_depth)) for r in replicas]
        self._next = itertools.cycle(range(len(self._workers)))
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def devices(self) -> list[str]:
        return [str(w.replica.device.name) for w in self._workers]

    @property
    def healthy(self) -> bool:
        """True while started and every worker is alive."""
        return self._pool is not None and not self._closed and all(w.alive for w in self._workers)

    def batches_done(self) -> dict[str, int]:
        """Batches each device has finished, by device name."""
        return {str(w.replica.device.name): w.batches for w in self._workers}

    def oom_splits(self) -> int:
        """Batches split in two after a CUDA out-of-memory error, over every replica."""
        return sum(getattr(w.replica, "oom_splits", 0) for w in self._workers)

    def busy_seconds(self) -> dict[str, float]:
        """Seconds each device has spent running batches, by device name."""
        return {str(w.replica.device.name): w.busy_s for w in self._workers}

    def start(self) -> Engine:
        """Starts one worker thread per replica."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self._workers), thread_name_prefix="esm2cli-replica")
            for worker in self._workers:
                self._pool.submit(self._run, worker)
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close(cancel=exc_info[0] is not None)

    def submit(self, seqs: Sequence[Any], block: bool = True, method: str = "embed_batch", **options) -> Future:
        """Queues one batch on the next replica in turn.

        Args:
            seqs: The batch's sequences (or the items that ``method`` takes).
            block: Wait for a free slot; when False, raise OverloadedError instead.
            method: The replica method that runs the batch: embed_batch, or lm_log_probs for scoring.
            **options: Passed to that method (per_token=True for windows of long proteins).

        Returns:
            A future resolved with the replica's result, or with the exception it raised.

        Raises:
            EngineError: The engine is not running, or the chosen replica's worker has died.
            OverloadedError: No free slot and block is False.
        """
        if self._pool is None or self._closed:
            raise EngineError("the engine is not running")
        with self._lock:
            worker = self._workers[next(self._next)]
        job = _Job(list(seqs), method, options=options)
        self._put(worker, job, block)
        if not worker.alive:  # it died while we queued: fail what it left behind, ours included
            self._fail_queued(worker)
        return job.future

    def _put(self, worker: _Worker, job: _Job, block: bool) -> None:
        while True:
            self._raise_if_dead(worker)
            try:
                worker.jobs.put(job, block=block, timeout=_PUT_POLL_S if block else None)
                return
            except queue.Full:
                if not block:
                    raise OverloadedError("every replica is busy; retry later") from None

    def _raise_if_dead(self, worker: _Worker) -> None:
        if not worker.alive:
            raise EngineError(f"the worker on {worker.replica.device.name} died: {worker.error!r}")

    def _run(self, worker: _Worker) -> None:
        """A worker's loop: take a job, embed, resolve its future; never leaves a waiter hanging."""
        job = None
        try:
            while (job := worker.jobs.get()) is not _STOP:
                if not job.future.set_running_or_notify_cancel():
                    continue  # the caller gave up: don't spend the device on it
                start = time.perf_counter()
                try:
                    result = getattr(worker.replica, job.method)(job.seqs, **job.options)
                except Exception as exc:  # fails this batch's waiters only
                    job.future.set_exception(BatchError(str(worker.replica.device.name), exc))
                else:
                    worker.batches += 1
                    job.future.set_result(result)
                finally:
                    worker.busy_s += time.perf_counter() - start
        except BaseException as exc:  # anything else kills the worker: record why, fail its batch
            worker.error = exc
            log.error("worker on %s died: %r", worker.replica.device.name, exc)
            if job is not None and job is not _STOP and not job.future.done():
                job.future.set_exception(EngineError(f"the worker on {worker.replica.device.name} died: {exc!r}"))
        finally:
            worker.alive = False
            self._fail_queued(worker)

    @staticmethod
    def _drain(worker: _Worker) -> list[_Job]:
        """Takes every job still queued for a worker (not the stop marker)."""
        jobs = []
        while True:
            try:
                job = worker.jobs.get_nowait()
            except queue.Empty:
                return jobs
            if job is not _STOP:
                jobs.append(job)

    def _fail_queued(self, worker: _Worker) -> None:
        for job in self._drain(worker):
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(
                    EngineError(f"the worker on {worker.replica.device.name} stopped before this batch ran")
                )

    def close(self, cancel: bool = False) -> None:
        """Stops the workers after the queued batches (or cancels them first when cancel is True)."""
        if self._pool is None or self._closed:
            self._closed = True
            return
        self._closed = True
        for worker in self._workers:
            if cancel:
                self._cancel_queued(worker)
            while worker.alive:
                try:
                    worker.jobs.put(_STOP, timeout=_PUT_POLL_S)
                    break
                except queue.Full:
                    continue
        self._pool.shutdown(wait=True)

    def _cancel_queued(self, worker: _Worker) -> None:
        for job in self._drain(worker):
            job.future.cancel()
