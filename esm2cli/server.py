"""The HTTP API: create_app(...) -> FastAPI, with /health, /live, /predict, /predict/batch and /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from esm2cli import __version__
from esm2cli.batcher import BatcherStats, DynamicBatcher
from esm2cli.config import BatchConfig, EmbedConfig, ModelConfig, ServeConfig
from esm2cli.engine import EngineSetup, build_engine
from esm2cli.errors import (
    EngineError,
    Esm2Error,
    InputError,
    NotReadyError,
    RequestTimeoutError,
    http_status,
)
from esm2cli.fasta import check_sequence, normalise
from esm2cli.metrics import ServerMetrics

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
WARMUP_SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"


class SequenceIn(BaseModel):
    sequence: str = Field(description="Protein sequence (one-letter codes; case and white space are ignored)")
    id: str | None = Field(default=None, description="Echoed back in the answer")


class BatchIn(BaseModel):
    sequences: list[SequenceIn | str] = Field(description="At most --max-client-batch sequences")


class EmbeddingOut(BaseModel):
    id: str | None
    length: int = Field(description="Residues before truncation")
    truncated: bool
    embedding: list[float] | None = Field(default=None, description="The pooled embedding (one layer)")
    embeddings: dict[str, list[float]] | None = Field(default=None, description="By layer, when several")


class BatchOut(BaseModel):
    results: list[EmbeddingOut]


class ErrorOut(BaseModel):
    error: str
    error_type: str


@dataclass
class _State:
    status: str = "loading"  # loading -> ok | failed
    setup: EngineSetup | None = None
    batcher: DynamicBatcher | None = None
    error: str | None = None


class BodySizeLimit:
    """Refuses request bodies over ``max_bytes`` with 422, counting what arrives (chunked bodies too)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen, over, refused = 0, False, False

        async def counting_receive():
            # Past the limit, the app sees the body end here (and fails to parse it); its answer is
            # replaced by ours below. Raising instead would reach FastAPI's body parser as a 400.
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                over = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def replacing_send(message):
            nonlocal refused
            if not over:
                return await send(message)
            if not refused:
                refused = True
                await self._refuse(send)

        await self.app(scope, counting_receive, replacing_send)

    async def _refuse(self, send):
        body = json.dumps({"error": f"request body over {self.max_bytes} bytes", "error_type": "InputError"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 422, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _checked(item: SequenceIn, where: str, serve: ServeConfig, truncate: int) -> tuple[str, int]:
    """Normalises and validates one sequence; returns it (truncated) and its full length."""
    seq = normalise(item.sequence)
    if problem := check_sequence(seq):
        raise InputError(f"{where}: {problem}")
    if len(seq) > truncate and not serve.truncation:
        raise InputError(f"{where}: {len(seq)} residues is over the maximum of {truncate} (truncation is off)")
    return seq[:truncate], len(seq)


def _label(where: str, item: SequenceIn) -> str:
    """Names an item in messages: where it stands in the request, and its id when it has one."""
    return where + (f" (id {item.id!r})" if item.id is not None else "")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        if error.get("type") == "json_invalid":
            parts.append(f"malformed JSON body: {error.get('ctx', {}).get('error', 'cannot parse')}")
            continue
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(
    serve: ServeConfig,
    model: ModelConfig,
    embed: EmbedConfig,
    loader: Callable[[], EngineSetup] | None = None,
    on_load_failure: Callable[[Exception], None] | None = None,
) -> FastAPI:
    """Builds the app; its lifespan loads the engine in the background and owns it.

    Args:
        serve: Bounds and batching.
        model, embed: What to load and compute (the same options as esm2cli embed).
        loader: Builds the engine (default: build_engine(model, embed)); tests may slow it down.
        on_load_failure: Called when loading fails (the CLI stops the server with exit code 1).
    """
    state = _State()
    metrics = ServerMetrics()
    loader = loader or (lambda: build_engine(model, embed))

    async def load() -> None:
        try:
            setup = await asyncio.to_thread(loader)
            setup.engine.start()
            await asyncio.to_thread(_warm_up, setup)
        except Exception as exc:
            state.status, state.error = "failed", str(exc)
            log.error("cannot start the engine: %s", exc)
            if on_load_failure:
                on_load_failure(exc)
            return
        stats = BatcherStats(on_batch=metrics.batch_size.observe, on_queue_depth=metrics.queue_depth.set)
        batcher = DynamicBatcher(
            setup.engine.submit,
            max_batch=serve.max_batch_size if serve.batching else serve.max_client_batch,
            max_wait_s=serve.max_wait_ms / 1000,
            max_tokens=BatchConfig(max_tokens=serve.max_tokens)
            .for_devices(any(d.is_cuda for d in setup.devices))
            .max_tokens,
            max_queue=serve.max_queue,
            max_in_flight=2 * len(setup.engine.devices),  # one running and one ready per replica
            coalesce=serve.batching,
            stats=stats,
        )
        batcher.start()
        metrics.watch_devices(setup.engine.busy_seconds)
        state.setup, state.batcher, state.status = setup, batcher, "ok"
        log.info("ready: %s on %s", setup.model.source, ", ".join(setup.engine.devices))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(load())  # the port opens now; /health says 503 until this is done
        yield
        await asyncio.gather(loading, return_exceptions=True)
        if state.batcher:
            await state.batcher.stop()
        if state.setup:
            state.setup.engine.close()

    app = FastAPI(title="esm2cli", version=__version__, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=serve.max_body_bytes)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in _ENDPOINTS else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(Esm2Error)
    async def _esm2_error(request: Request, exc: Esm2Error) -> JSONResponse:
        status = http_status(exc)
        headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
        body = {"error": str(exc), "error_type": type(exc).__name__}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc), "error_type": "InputError"}, status_code=422)

    def _ready() -> tuple[EngineSetup, DynamicBatcher]:
        if state.status != "ok" or state.setup is None or state.batcher is None:
            raise NotReadyError(
                "the model is still loading" if state.status == "loading" else f"not ready: {state.error}"
            )
        if not state.setup.engine.healthy:
            raise EngineError("a device worker has died; the server must be restarted")
        return state.setup, state.batcher

    async def _embed(items: list[SequenceIn], labels: list[str]) -> list[EmbeddingOut]:
        setup, batcher = _ready()
        checked = [_checked(item, where, serve, embed.truncate) for item, where in zip(items, labels, strict=True)]
        metrics.pending.set(batcher.pending + len(checked))
        try:
            rows = await asyncio.wait_for(batcher.embed([s for s, _ in checked]), serve.request_timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(f"not answered within {serve.request_timeout_s:g} s; retry later") from None
        finally:
            metrics.pending.set(batcher.pending)
        return [
            _answer(item, length, row, setup.layers)
            for item, (_, length), row in zip(items, checked, rows, strict=True)
        ]

    def _answer(item: SequenceIn, length: int, row: dict, layers: tuple[int, ...]) -> EmbeddingOut:
        truncated = length > embed.truncate
        if len(layers) == 1:
            return EmbeddingOut(id=item.id, length=length, truncated=truncated, embedding=row[layers[0]].tolist())
        vectors = {f"l{layer}": row[layer].tolist() for layer in layers}
        return EmbeddingOut(id=item.id, length=length, truncated=truncated, embeddings=vectors)

    errors = {422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}}

    @app.get("/health", responses={503: {"description": "Loading, failed, or a device worker died"}})
    async def health() -> JSONResponse:
        """Readiness: 200 once every replica is loaded and warm, 503 before (and if a worker dies)."""
        body = {"status": state.status, "model": model.model, "version": __version__}
        if state.status == "failed":
            body["error"] = state.error
        if state.status != "ok" or state.setup is None:
            return JSONResponse(body, status_code=503)
        from esm2cli.devices import cuda_device_count

        engine = state.setup.engine
        body.update(
            status="ok" if engine.healthy else "unhealthy",
            physical_cuda_available=cuda_device_count() > 0,
            logical_devices=len(engine.devices),
            devices=engine.devices,
            dtype=state.setup.dtype,
            layers=list(state.setup.layers),
            random_weights=state.setup.model.dummy,
        )
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

    @app.get("/live", responses={503: {"description": "Loading failed or a device worker died"}})
    async def live() -> JSONResponse:
        """Liveness: 200 while the process serves or is still loading; 503 once it cannot recover."""
        dead = state.status == "failed" or (state.setup is not None and not state.setup.engine.healthy)
        return JSONResponse({"status": "dead" if dead else "alive"}, status_code=503 if dead else 200)

    @app.post("/predict", response_model=EmbeddingOut, responses=errors)
    async def predict(body: SequenceIn) -> EmbeddingOut:
        """Embeds one sequence."""
        (answer,) = await _embed([body], [_label("sequence", body)])
        return answer

    @app.post("/predict/batch", response_model=BatchOut, responses=errors)
    async def predict_batch(body: BatchIn) -> BatchOut:
        """Embeds up to --max-client-batch sequences; answers in request order."""
        if len(body.sequences) > serve.max_client_batch:
            raise InputError(f"batch size {len(body.sequences)} > maximum allowed batch size {serve.max_client_batch}")
        if not body.sequences:
            raise InputError("sequences: empty list")
        items = [SequenceIn(sequence=s) if isinstance(s, str) else s for s in body.sequences]
        return BatchOut(results=await _embed(items, [_label(f"sequences[{i}]", item) for i, item in enumerate(items)]))

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus metrics."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


_ENDPOINTS = {"/health", "/live", "/predict", "/predict/batch", "/metrics"}


def _warm_up(setup: EngineSetup) -> None:
    """Runs one small batch on every replica, so that /health turns 200 only when each is warm."""
    futures = [setup.engine.submit([WARMUP_SEQUENCE]) for _ in setup.engine.devices]
    for future in futures:
        future.result()
