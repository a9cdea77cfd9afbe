"""The server's work behind its routes: readiness, checks, the cache, the batcher race and the answers.

EmbeddingService owns everything a route does between a parsed request and its answer, so that it can
be driven without an app or a socket (tests/serve/test_service.py): the engine's loading and its
readiness, the checks a sequence passes (as FASTA records do), the per-client cache, the race of the
batcher's answer against the client leaving and ``--request-timeout``, and the answer's shape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from esm2cli.config import WARMUP_SEQUENCE, EmbedConfig, ModelConfig, ServeConfig, __version__
from esm2cli.errors import (
    ClientDisconnectedError,
    EngineError,
    Esm2Error,
    InputError,
    NotReadyError,
    RequestTimeoutError,
    TooLargeError,
)
from esm2cli.io.fasta import check_sequence, check_text, normalise
from esm2cli.io.identity import stamp_weights
from esm2cli.runtime.engine import EngineSetup, build_server_engine
from esm2cli.runtime.windows import WindowPlan, window_count, window_starts
from esm2cli.serve.batcher import BatcherStats, DynamicBatcher
from esm2cli.serve.cache import OPEN_PARTITION, EmbeddingCache, cache_identity
from esm2cli.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


Row = dict[Any, Any]  # {layer: pooled vector} of one sequence
_T = TypeVar("_T")
Item = tuple[str, str | None]  # (sequence, id) as the request sent them


class SequenceIn(BaseModel):
    sequence: str = Field(description="Protein sequence (one-letter codes; case and white space are ignored)")
    id: str | None = Field(default=None, description="Echoed back in the answer")


class EmbeddingOut(BaseModel):
    id: str | None
    length: int = Field(description="Residues before truncation")
    truncated: bool
    windows: int = Field(default=1, description="Windows the protein was embedded in (--long-sequences window)")
    embedding: list[float] | None = Field(default=None, description="The pooled embedding (one layer)")
    embeddings: dict[str, list[float]] | None = Field(default=None, description="By layer, when several")


def public_model_name(model: str) -> str:
    """The model as the API shows it: a local directory by its last component only (paths stay private)."""
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        return path.resolve().name
    return model


def _decided(value: _T | None) -> _T:
    """A value the engine or the batcher has decided by now (None: a broken invariant)."""
    if value is None:
        raise EngineError("a value the engine decides is missing; this is a bug")
    return value


def label(where: str, item: SequenceIn) -> str:
    """Names an item in messages: where it stands in the request, and its id when it has one."""
    return where + (f" (id {item.id!r})" if item.id is not None else "")


class EmbeddingService:
    """The engine behind the server, from loading to answers.

    Args:
        serve: Bounds, batching and the cache size.
        model, embed: What to load and compute (the same options as esm2cli embed).
        metrics: Where batches, the queue, devices and the cache are shown.
        loader: Builds the engine (default: build_server_engine(model, embed, serve)); tests may slow it down.
        on_load_failure: Called when loading fails (the CLI stops the server with exit code 1).
        check_loaded: Called in the loading thread with the engine and the weights' identity once they are known;
            what it raises fails the load (the search database's identity check).
    """

    def __init__(
        self,
        serve: ServeConfig,
        model: ModelConfig,
        embed: EmbedConfig,
        *,
        metrics: ServerMetrics,
        loader: Callable[[], EngineSetup] | None = None,
        on_load_failure: Callable[[Exception], None] | None = None,
        check_loaded: Callable[[EngineSetup, str], None] | None = None,
    ):
        self.serve, self.model, self.embed_config, self.metrics = serve, model, embed, metrics
        self.model_id = public_model_name(model.model)
        self.cache: EmbeddingCache | None = None  # keyed by the weights loaded: made once they are
        self._loader = loader or (lambda: build_server_engine(model, embed, serve))
        self._on_load_failure = on_load_failure
        self._check_loaded = check_loaded
        self.status = "loading"  # loading -> ok | failed
        self.setup: EngineSetup | None = None
        self.batcher: DynamicBatcher | None = None

    async def load(self) -> None:
        """Loads and warms the engine, then starts the batcher; a failure leaves the service "failed"."""
        try:
            setup, identity = await asyncio.to_thread(self._load_named)
            setup.engine.start()
            await asyncio.to_thread(setup.engine.warm_up, [WARMUP_SEQUENCE])  # /health turns 200 once each is warm
        except Exception as exc:
            self.status = "failed"
            if isinstance(exc, Esm2Error):
                log.error("cannot start the engine: %s", exc)
            else:
                log.exception("cannot start the engine; this is a bug")
            if self._on_load_failure:
                self._on_load_failure(exc)
            return
        self.cache = EmbeddingCache(self.serve.cache_size, identity)
        self.metrics.watch_cache(self.cache)
        self.batcher = self._batcher(setup)
        self.batcher.start()
        self.metrics.watch_devices(setup.engine.busy_seconds)
        self.metrics.watch_queue(lambda: self.batcher.pending if self.batcher else 0,
                                 lambda: self.batcher.waiting if self.batcher else 0)  # fmt: skip
        self.setup, self.status = setup, "ok"
        log.info("ready: %s on %s", setup.model.source, ", ".join(setup.engine.devices))

    def _load_named(self) -> tuple[EngineSetup, bytes]:
        """Loads the engine; returns it with the cache's identity, named by the weights' bytes it loaded."""
        from esm2cli.model.architecture import resolve_source

        stamp = stamp_weights(resolve_source(self.model.model), self.model.load_format)
        setup = self._loader()
        try:
            weights = stamp.confirm(setup.model.source, setup.model.config.to_dict())
            if self._check_loaded:
                self._check_loaded(setup, weights)
        except BaseException:
            setup.engine.close()
            raise
        return setup, cache_identity(
            weights=weights, dtype=setup.dtype, embed=self.embed_config, model_family=setup.model.family
        )

    def _batcher(self, setup: EngineSetup) -> DynamicBatcher:
        serve = self.serve
        # Windows of long proteins are stitched from their residues' vectors, so every batch brings them back.
        window = self.embed_config.long_sequences == "window"
        submit = partial(setup.engine.submit, per_token=True) if window else setup.engine.submit
        return DynamicBatcher(
            submit,
            max_batch=serve.max_batch_size if serve.batching else serve.max_client_batch,
            max_wait_s=serve.max_wait_ms / 1000,
            max_tokens=_decided(setup.batch.max_tokens),
            max_queue=serve.max_queue,
            max_in_flight=2 * len(setup.engine.devices),  # one running and one ready per replica
            coalesce=serve.batching,
            stats=BatcherStats(on_batch=self.metrics.batch_size.observe),
        )

    async def stop(self) -> None:
        """Answers what was accepted, then closes the engine."""
        if self.batcher:
            await self.batcher.stop()
        if self.setup:
            self.setup.engine.close()

    def ready(self) -> tuple[EngineSetup, DynamicBatcher]:
        """The engine and batcher, once loaded and healthy.

        Raises:
            NotReadyError: Still loading, or loading failed (503).
            EngineError: A device worker died (500).
        """
        if self.status != "ok" or self.setup is None or self.batcher is None:
            raise NotReadyError(
                "the model is still loading" if self.status == "loading" else "the model failed to load"
            )
        if not self.setup.engine.healthy:
            raise EngineError("a device worker has died; the server must be restarted")
        return self.setup, self.batcher

    def health(self) -> tuple[dict[str, Any], int]:
        """Readiness: the body and status of /health (200 once every replica is loaded and warm)."""
        body: dict[str, Any] = {"status": self.status, "model": self.model_id, "version": __version__}
        if self.status == "failed":
            body["error"] = "the model failed to load (the server log says why)"
        if self.status != "ok" or self.setup is None:
            return body, 503
        from esm2cli.runtime.devices import cuda_device_count

        engine = self.setup.engine
        body.update(
            status="ok" if engine.healthy else "unhealthy",
            physical_cuda_available=cuda_device_count() > 0,
            logical_devices=len(engine.devices),
            devices=engine.devices,
            dtype=self.setup.dtype,
            layers=list(self.setup.layers),
            random_weights=self.setup.model.dummy,
        )
        return body, 200 if engine.healthy else 503

    def live(self) -> tuple[dict[str, Any], int]:
        """Liveness: 200 while serving or still loading; 503 once the process cannot recover."""
        dead = self.status == "failed" or (self.setup is not None and not self.setup.engine.healthy)
        return {"status": "dead" if dead else "alive"}, 503 if dead else 200

    def vector_info(self) -> tuple[int, int]:
        """(the layer a single-vector answer carries, the vector size); raises while not ready."""
        setup, _ = self.ready()
        return setup.layers[-1], setup.model.hidden_size

    def tokens_of(self, length: int) -> int:
        """Tokens the model sees for a sequence of ``length`` residues (after truncation or in windows)."""
        from esm2cli.runtime.windows import model_tokens

        return model_tokens(length, self.embed_config)

    async def embed(
        self,
        items: Sequence[Item],
        labels: Sequence[str],
        *,
        client: bytes = OPEN_PARTITION,
        disconnected: Callable[[], Awaitable[Any]],
    ) -> list[tuple[int, Row]]:
        """Checks, looks up and embeds; returns (residues before truncation, {layer: vector}) per item, in order.

        Args:
            items: (sequence, id) pairs as the request sent them.
            labels: How messages name each item ("sequences[3] (id 'x')").
            client: The cache partition of the request's API key.
            disconnected: Returns an awaitable that completes when the client has left.

        Raises:
            InputError, TooLargeError: The request is invalid, or could never fit the queue.
            NotReadyError, EngineError: Not loaded, or a worker died.
            ClientDisconnectedError: The client left first; its sequences were dropped from the queue.
            RequestTimeoutError: Not answered within --request-timeout.
        """
        _, batcher = self.ready()
        cache = _decided(self.cache)
        checked = [self._checked(seq, rec_id, where) for (seq, rec_id), where in zip(items, labels, strict=True)]
        self._check_fits([seq for seq, _ in checked])
        rows = [cache.get(client, seq) for seq, _ in checked]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            plan = WindowPlan(self.embed_config, [checked[i][0] for i in todo])
            for i, row in zip(todo, plan.rows(await self._race(batcher, plan, disconnected)), strict=True):
                rows[i] = row
                cache.put(client, checked[i][0], row)
        return [(length, _decided(row)) for (_, length), row in zip(checked, rows, strict=True)]

    async def _race(
        self, batcher: DynamicBatcher, plan: WindowPlan, disconnected: Callable[[], Awaitable[Any]]
    ) -> list[Row]:
        """The batcher's answer (windows stitched as they come back), unless the client leaves or
        --request-timeout passes first."""
        work = asyncio.ensure_future(batcher.embed(plan.items, take=plan.take))
        gone = asyncio.ensure_future(disconnected())
        timeout = self.serve.request_timeout_s
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # the batcher drops what was not yet submitted, and cancels batches only it needed
                await asyncio.gather(work, return_exceptions=True)  # its places in the queue are free on return
        if work in done:
            return work.result()
        if gone in done:
            raise ClientDisconnectedError("the client closed the connection before the answer was ready")
        raise RequestTimeoutError(f"not answered within {timeout:g} s; retry later")

    def _checked(self, sequence: str, rec_id: str | None, where: str) -> tuple[str, int]:
        """Normalises and validates one sequence (as FASTA records are); returns it (truncated) and its full length."""
        truncate, mode = self.embed_config.truncate, self.embed_config.long_sequences
        # As FASTA ids are: JSON can carry lone surrogates (which no UTF-8 answer can hold) and control characters.
        if rec_id is not None and (problem := check_text(rec_id, "the id")):
            raise InputError(f"{where}: {problem}", param="id")
        seq = normalise(sequence)
        if problem := check_sequence(seq):
            raise InputError(f"{where}: {problem}")
        if len(seq) > truncate and (not self.serve.truncation or mode == "error"):
            raise InputError(f"{where}: {len(seq)} residues is over the maximum of {truncate} (truncation is off)")
        return (seq if mode == "window" else seq[:truncate]), len(seq)

    def _check_fits(self, seqs: list[str]) -> None:
        """Refuses (413) a request that needs more queue places than --max-queue: it could never be served,
        and a 429 would have clients retry it forever. In window mode each window takes a place."""
        embed, max_queue = self.embed_config, self.serve.max_queue
        if embed.long_sequences == "window":
            needed = sum(window_count(len(s), embed.truncate, embed.window_overlap) for s in seqs)
        else:
            needed = len(seqs)
        if needed > max_queue:
            windows = (
                f" (windows of {embed.truncate} residues, overlap {embed.window_overlap})" if needed > len(seqs) else ""
            )
            raise TooLargeError(
                f"the request needs {needed:,} queue places{windows}, more than the server ever holds "
                f"(--max-queue {max_queue:,}); send fewer or shorter sequences"
            )

    def answer(self, item: SequenceIn, length: int, row: Row) -> EmbeddingOut:
        """The answer for one sequence: its vector (or vectors by layer) and how it was cut."""
        embed = self.embed_config
        layers = self.setup.layers if self.setup else ()
        truncated = length > embed.truncate and embed.long_sequences != "window"
        windows = len(window_starts(length, embed.truncate, embed.window_overlap)) if not truncated else 1
        if len(layers) == 1:
            vector = row[layers[0]].tolist()
            return EmbeddingOut(id=item.id, length=length, truncated=truncated, windows=windows, embedding=vector)
        by_layer = {f"l{layer}": row[layer].tolist() for layer in layers}
        return EmbeddingOut(id=item.id, length=length, truncated=truncated, windows=windows, embeddings=by_layer)

    async def embed_items(
        self,
        items: list[SequenceIn],
        labels: list[str],
        *,
        client: bytes = OPEN_PARTITION,
        disconnected: Callable[[], Awaitable[Any]],
    ) -> list[EmbeddingOut]:
        """Embeds the items of /predict or /predict/batch; answers in request order."""
        pairs = [(item.sequence, item.id) for item in items]
        rows = await self.embed(pairs, labels, client=client, disconnected=disconnected)
        return [self.answer(item, length, row) for item, (length, row) in zip(items, rows, strict=True)]
