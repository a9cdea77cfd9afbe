"""The Engine: one worker thread per replica, pulling batches from one shared bounded queue; futures."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from esm2cli.config import BatchConfig, EmbedConfig, ModelConfig, ServeConfig
from esm2cli.errors import BatchError, ConfigError, EngineError
from esm2cli.runtime.batching import SMALLEST_TOKEN_BUCKET

log = logging.getLogger(__name__)

_STOP = object()
_PUT_POLL_S = 0.1  # how often a blocked submit re-checks that the workers are still alive
SERVER_SMALLEST_BUCKET = 256  # the server's CUDA graphs start here (a single short request is its common batch)
_WARM_UP_TIMEOUT_S = 600.0  # a replica's first batch may compile kernels or fill caches: minutes, not hours


class BatchRunner(Protocol):
    """What the engine needs of a replica: a device with a name, and embed_batch."""

    device: Any

    def embed_batch(self, seqs: Sequence[str]) -> Any: ...


@dataclass
class _Job:
    seqs: Sequence[Any]
    method: str = "embed_batch"  # the replica method that runs the batch
    future: Future = field(default_factory=Future)
    options: dict = field(default_factory=dict)  # keyword arguments for embed_batch (per_token)
    # Run by the worker after its batch and before it takes the next one (warm_up's barrier).
    then: Callable[[], None] | None = None


@dataclass
class _Worker:
    replica: BatchRunner
    alive: bool = True
    error: BaseException | None = None
    busy_s: float = 0.0


@dataclass
class EngineSetup:
    """The runtime of a command: an engine ready to start, and every value resolved on the way.

    Attributes:
        engine: One worker per replica, not started.
        model: The loaded model (esm2cli.model.LoadedModel): source, hidden size, layers, tokens.
        layers: The layer indices computed, resolved against the model.
        devices: One esm2cli.runtime.devices.Device per replica.
        dtype: The dtype the weights run in ("auto" decided).
        batch: The batch settings, with max_tokens decided for these devices.
        replicas: The replicas the engine runs, in device order.
    """

    engine: Engine
    model: Any
    layers: tuple[int, ...]
    devices: list[Any]
    dtype: str
    batch: BatchConfig
    replicas: list[Any]

    @property
    def placement(self) -> Placement:
        """The devices and dtype this runtime was built for."""
        return Placement(self.devices, self.dtype)


@dataclass(frozen=True)
class Placement:
    """Where and in what a run computes: its devices and the dtype ``--dtype auto`` resolved to for them."""

    devices: list[Any]
    dtype: str


def resolve_placement(model: ModelConfig) -> Placement:
    """Resolves the devices and the dtype of ``model``, once; build_engine takes the result.

    A run that needs the dtype before it loads anything (embed's "already complete" check) resolves it
    here and hands the same Placement to build_engine, so the two can never disagree.

    Raises:
        DeviceError: The device list is unusable.
    """
    from esm2cli.runtime.devices import modeled_devices, resolve_devices, resolve_dtype

    devices = modeled_devices(model.simulate) if model.simulate else resolve_devices(model.devices)
    return Placement(devices, resolve_dtype(model.dtype, devices))


def build_engine(
    model: ModelConfig,
    embed: EmbedConfig,
    batch: BatchConfig | None = None,
    queue_depth: int = 2,
    lm_head: bool = False,
    placement: Placement | None = None,
    *,
    smallest_bucket: int = SMALLEST_TOKEN_BUCKET,
) -> EngineSetup:
    """Assembles the runtime once: devices, dtype, model, replicas and token budget.

    embed, serve, score, bench and the benchmarks all start here, so that each value is resolved in
    one place. With ``model.simulate`` set, the replicas are modeled GPUs (esm2cli.runtime.modeled): the model
    is built without weights and each batch takes the time the card would take.

    Args:
        model: What to load and where.
        embed: Layers, pooling and per-token output; the contact head is loaded when ``embed.contacts``
            asks for it.
        batch: Batch size and token budget (max_tokens None: the default of the device kind).
        queue_depth: Batches waiting per replica at most (the shared queue holds depth x replicas).
        lm_head: Also load the masked-LM head (esm2cli score).
        placement: Devices and dtype already resolved by resolve_placement (None: resolved here).
        smallest_bucket: The CUDA graphs' smallest token bucket; the graphs hold batches of up to
            ``batch.batch_size`` sequences.

    Raises:
        DeviceError, ConfigError, ModelLoadError: The devices, options or model are unusable.
    """
    # Imported here so that importing the engine does not import torch.
    from esm2cli.model.load import load_model
    from esm2cli.runtime.memory import bound_kernel_caches
    from esm2cli.runtime.replica import build_replicas, resolve_layers

    bound_kernel_caches()  # before the process's first forward, when the kernel libraries read the bound
    if model.simulate and (lm_head or embed.contacts):
        raise ConfigError("modeled GPUs compute embeddings only: no contacts and no scores")
    placement = placement or resolve_placement(model)
    devices, dtype = placement.devices, placement.dtype
    if dtype != model.dtype:
        # Said, not only done: half precision moves a vector from its float32 value (never with its batch mates).
        stable = (
            ""
            if dtype == "float32"
            else " (cosine >= 0.999 to float32 vectors, bit-identical from run to run; --dtype float32 for float32)"
        )
        log.info("--dtype auto: %s on %s%s", dtype, ", ".join(d.name for d in devices), stable)
    loaded = load_model(
        replace(model, dtype=dtype), lm_head=lm_head, contact_head=embed.contacts, weights=model.simulate is None
    )
    if loaded.family == "esmc" and embed.truncate > loaded.context:  # ESM-2's rotary positions extend; not ESM C's
        raise ConfigError(f"--truncate {embed.truncate} is over ESM C's context of {loaded.context} residues")
    layers = resolve_layers(embed.layers, loaded.num_layers)
    # The one place the token budget is decided: every command reads setup.batch.
    batch = (batch or BatchConfig()).for_devices(any(d.is_gpu for d in devices))
    replicas: Sequence[BatchRunner]
    if model.simulate:
        from esm2cli.runtime.modeled import build_modeled_replicas

        replicas = build_modeled_replicas(loaded, devices, embed, model.simulate, dtype)
    else:
        replicas = build_replicas(loaded, devices, embed, batch, smallest_bucket=smallest_bucket)
        _capture_graphs(replicas)
    engine = Engine(replicas, queue_depth=queue_depth)
    return EngineSetup(engine, loaded, layers, devices, dtype, batch, list(replicas))


def build_server_engine(model: ModelConfig, embed: EmbedConfig, serve: ServeConfig) -> EngineSetup:
    """build_engine for esm2cli serve: CUDA graphs for the server's batches and its short requests.

    The graphs hold the batches the server's batcher submits (``--max-batch-size`` sequences, or
    ``--max-client-batch`` without dynamic batching): a larger batch than the graphs hold would run eagerly.
    Their buckets start at SERVER_SMALLEST_BUCKET tokens, so that a 300-residue request computes a
    320-token bucket, not a 1,024-token one.
    """
    size = serve.max_batch_size if serve.batching else serve.max_client_batch
    batch = BatchConfig(batch_size=size, max_tokens=serve.max_tokens)
    return build_engine(model, embed, batch, smallest_bucket=SERVER_SMALLEST_BUCKET)


def _capture_graphs(replicas: Sequence[Any]) -> None:
    """Captures every CUDA replica's graphs before the first batch, one replica after another.

    Not side by side: torch allows one capture at a time in a process (a capture's start synchronises and empties
    the caching allocator, and in the default mode any other thread's CUDA call breaks it), and each replica
    captures on its own device's stream (esm2cli.model.graphs.capture_stream).
    """
    cuda = [r for r in replicas if getattr(r, "graphs", None) is not None]
    if not cuda:
        return
    start = time.perf_counter()
    for replica in cuda:
        replica.warm_up()
    log.info("CUDA graphs ready on %d device(s) in %.1f s", len(cuda), time.perf_counter() - start)


class Engine:
    """Runs batches on every replica in parallel and hands back futures.

    Every replica's worker pulls the next batch from one shared queue as soon as it is free, so
    no batch waits behind a busy replica while another idles; with equal replicas and equal
    batches this is round-robin. The queue holds at most ``queue_depth`` batches per replica:
    work in flight is bounded and ``submit`` blocks once it is full.

    Use it as a context manager, or call start() and close().
    """

    def __init__(self, replicas: Sequence[BatchRunner], queue_depth: int = 2):
        if not replicas:
            raise ValueError("an Engine needs at least one replica; this is a bug")
        self._workers = [_Worker(r) for r in replicas]
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_depth * len(replicas))
        self._threads: list[threading.Thread] | None = None
        self._closed = False

    @property
    def devices(self) -> list[str]:
        return [str(w.replica.device.name) for w in self._workers]

    @property
    def healthy(self) -> bool:
        """True while started and every worker is alive."""
        return self._threads is not None and not self._closed and all(w.alive for w in self._workers)

    def oom_splits(self) -> int:
        """Batches split in two after a CUDA out-of-memory error, over every replica."""
        return sum(getattr(w.replica, "oom_splits", 0) for w in self._workers)

    def busy_seconds(self) -> dict[str, float]:
        """Seconds each device has spent running batches, by device name."""
        return {str(w.replica.device.name): w.busy_s for w in self._workers}

    def start(self) -> Engine:
        """Starts one worker thread per replica.

        The threads are daemons: a script that never calls close() still exits (a ThreadPoolExecutor's
        threads are joined at interpreter exit, and ours wait on the queue forever). Owners that want
        the queued batches finished call close(), as the Python API does from a finalizer at exit.
        """
        if self._threads is None:
            self._threads = [
                threading.Thread(target=self._run, args=(worker,), name=f"esm2cli-replica-{n}", daemon=True)
                for n, worker in enumerate(self._workers)
            ]
            for thread in self._threads:
                thread.start()
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close(cancel=exc_info[0] is not None)

    def submit(self, seqs: Sequence[Any], method: str = "embed_batch", **options) -> Future:
        """Queues one batch for the next free replica; blocks while the queue is full.

        Args:
            seqs: The batch's sequences (or the items that ``method`` takes).
            method: The replica method that runs the batch: embed_batch, or lm_log_probs for scoring.
            **options: Passed to that method (per_token=True for windows of long proteins).

        Returns:
            A future resolved with the replica's result (CPU float32), or with the exception it raised.

        Raises:
            EngineError: The engine is not running, or a worker has died.
        """
        return self._put(_Job(list(seqs), method, options=options))

    def warm_up(self, seqs: Sequence[str]) -> None:
        """Runs one batch on every replica (each exactly once) and waits for them.

        A worker that has run its warm-up batch waits for the others before it takes more work,
        so that every replica gets one of the batches even though replicas pull from one queue.

        Raises:
            EngineError: The engine is not running, or a replica failed its batch.
        """
        barrier = threading.Barrier(len(self._workers))

        def wait_for_the_others() -> None:
            try:
                barrier.wait(_WARM_UP_TIMEOUT_S)
            except threading.BrokenBarrierError:  # another replica failed: its waiter reports it
                pass

        futures = [self._put(_Job(list(seqs), then=wait_for_the_others)) for _ in self._workers]
        try:
            for future in futures:
                future.result()
        finally:
            barrier.abort()  # releases the workers still waiting when a warm-up batch failed

    def _put(self, job: _Job) -> Future:
        if self._threads is None or self._closed:
            raise EngineError("the engine is not running")
        while True:
            self._raise_if_dead()
            try:
                self._jobs.put(job, timeout=_PUT_POLL_S)
                break
            except queue.Full:
                continue
        if not any(w.alive for w in self._workers):  # the last worker died while we queued
            self._fail_queued()
        return job.future

    def _raise_if_dead(self) -> None:
        for worker in self._workers:
            if not worker.alive:
                raise EngineError(f"the worker on {worker.replica.device.name} died: {worker.error!r}")

    def _run(self, worker: _Worker) -> None:
        """A worker's loop: take a job, embed, resolve its future; never leaves a waiter hanging."""
        job = None
        try:
            while (job := self._jobs.get()) is not _STOP:
                if not job.future.set_running_or_notify_cancel():
                    continue  # the caller gave up: don't spend the device on it
                start = time.perf_counter()
                try:
                    result = getattr(worker.replica, job.method)(job.seqs, **job.options)
                except Exception as exc:  # fails this batch's waiters only
                    job.future.set_exception(BatchError(str(worker.replica.device.name), exc))
                else:
                    job.future.set_result(result)
                finally:
                    worker.busy_s += time.perf_counter() - start
                if job.then:
                    job.then()
        except BaseException as exc:  # anything else kills the worker: record why, fail its batch
            worker.error = exc
            log.error("worker on %s died: %r", worker.replica.device.name, exc)
            if job is not None and job is not _STOP and not job.future.done():
                job.future.set_exception(EngineError(f"the worker on {worker.replica.device.name} died: {exc!r}"))
        finally:
            worker.alive = False
            if not any(w.alive for w in self._workers):  # nobody is left to run what is queued
                self._fail_queued()

    def _drain(self) -> list[_Job]:
        """Takes every job still queued (not the stop markers)."""
        jobs: list[_Job] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return jobs
            if job is not _STOP:
                jobs.append(job)

    def _fail_queued(self) -> None:
        for job in self._drain():
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineError("every worker has stopped before this batch ran"))

    def close(self, cancel: bool = False) -> None:
        """Stops the workers after the queued batches (or cancels them first when cancel is True)."""
        if self._threads is None or self._closed:
            self._closed = True
            return
        self._closed = True
        if cancel:
            for job in self._drain():
                job.future.cancel()
        stops = 0
        while stops < len(self._workers) and any(w.alive for w in self._workers):
            try:
                self._jobs.put(_STOP, timeout=_PUT_POLL_S)  # FIFO: after every queued batch
                stops += 1
            except queue.Full:
                continue
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        for worker in self._workers:
            close_replica = getattr(worker.replica, "close", None)  # a modeled replica holds nothing to give back
            if close_replica is not None:
                close_replica()
