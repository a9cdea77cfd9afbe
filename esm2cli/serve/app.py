"""The HTTP API: create_app(...) -> FastAPI, with /health, /live, /predict, /predict/batch, /v1 and /metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from esm2cli.config import BatchConfig, EmbedConfig, ModelConfig, ServeConfig, __version__
from esm2cli.errors import (
    ClientDisconnectedError,
    EngineError,
    Esm2Error,
    InputError,
    NotReadyError,
    RequestTimeoutError,
    TooLargeError,
    http_status,
)
from esm2cli.io.fasta import check_sequence, check_text, normalise
from esm2cli.runtime.engine import EngineSetup, build_engine
from esm2cli.runtime.windows import WindowPlan, model_tokens, window_count, window_starts
from esm2cli.serve.auth import KeyChecker
from esm2cli.serve.batcher import BatcherStats, DynamicBatcher
from esm2cli.serve.cache import EmbeddingCache
from esm2cli.serve.connections import AcceptErrorLimiter
from esm2cli.serve.guard import RequestGuard
from esm2cli.serve.http_errors import encode, error_headers, error_payload
from esm2cli.serve.metrics import ServerMetrics
from esm2cli.serve.openai_routes import openai_router

log = logging.getLogger(__name__)

WARMUP_SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"
ENDPOINTS = frozenset({"/health", "/live", "/predict", "/predict/batch", "/metrics", "/v1/embeddings", "/v1/models"})


class SequenceIn(BaseModel):
    sequence: str = Field(description="Protein sequence (one-letter codes; case and white space are ignored)")
    id: str | None = Field(default=None, description="Echoed back in the answer")


class BatchIn(BaseModel):
    sequences: list[SequenceIn | str] = Field(description="At most --max-client-batch sequences")


class EmbeddingOut(BaseModel):
    id: str | None
    length: int = Field(description="Residues before truncation")
    truncated: bool
    windows: int = Field(default=1, description="Windows the protein was embedded in (--long-sequences window)")
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


def public_model_name(model: str) -> str:
    """The model as the API shows it: a local directory by its last component only (paths stay private)."""
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        return path.resolve().name
    return model


def _checked(sequence: str, rec_id: str | None, where: str, serve: ServeConfig, embed: EmbedConfig) -> tuple[str, int]:
    """Normalises and validates one sequence (as FASTA records are); returns it (truncated) and its full length."""
    truncate = embed.truncate
    # As FASTA ids are: JSON can carry lone surrogates (which no UTF-8 answer can hold) and control characters.
    if rec_id is not None and (problem := check_text(rec_id, "the id")):
        raise InputError(f"{where}: {problem}", param="id")
    seq = normalise(sequence)
    if problem := check_sequence(seq):
        raise InputError(f"{where}: {problem}")
    if len(seq) > truncate and (not serve.truncation or embed.long_sequences == "error"):
        raise InputError(f"{where}: {len(seq)} residues is over the maximum of {truncate} (truncation is off)")
    return (seq if embed.long_sequences == "window" else seq[:truncate]), len(seq)


def _check_fits(seqs: list[str], serve: ServeConfig, embed: EmbedConfig) -> None:
    """Refuses (413) a request that needs more queue places than --max-queue: it could never be served,
    and a 429 would have clients retry it forever. In window mode each window takes a place."""
    if embed.long_sequences == "window":
        needed = sum(window_count(len(s), embed.truncate, embed.window_overlap) for s in seqs)
    else:
        needed = len(seqs)
    if needed > serve.max_queue:
        windows = (
            f" (windows of {embed.truncate} residues, overlap {embed.window_overlap})" if needed > len(seqs) else ""
        )
        raise TooLargeError(
            f"the request needs {needed:,} queue places{windows}, more than the server ever holds "
            f"(--max-queue {serve.max_queue:,}); send fewer or shorter sequences"
        )


def _label(where: str, item: SequenceIn) -> str:
    """Names an item in messages: where it stands in the request, and its id when it has one."""
    return where + (f" (id {item.id!r})" if item.id is not None else "")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for the client, and the first field at fault."""
    parts, param = [], None
    for error in exc.errors()[:5]:
        if error.get("type") == "json_invalid":
            parts.append(f"malformed JSON body: {error.get('ctx', {}).get('error', 'cannot parse')}")
            continue
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts), param


def _body_error(exc: BaseException | None) -> str:
    """Why FastAPI could not parse a body (it answers 400 with a generic detail; the cause says more)."""
    if isinstance(exc, RecursionError):
        return "malformed JSON body: nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"malformed JSON body: not UTF-8 ({exc.reason} at byte {exc.start})"
    return "malformed JSON body: cannot parse"


def _json_error(request: Request, status: int, message: str, error_type: str, param: str | None = None) -> Response:
    body = encode(error_payload(request.url.path, status, message, error_type, param=param))
    headers = {k.decode(): v.decode() for k, v in error_headers(status) if k != b"content-type"}
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def _until_disconnected(receive) -> None:
    """Returns when the client has closed its connection (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(
    serve: ServeConfig,
    model: ModelConfig,
    embed: EmbedConfig,
    loader: Callable[[], EngineSetup] | None = None,
    on_load_failure: Callable[[Exception], None] | None = None,
) -> FastAPI:
    """Builds the app; its lifespan loads the engine in the background and owns it.

    Args:
        serve: Bounds, batching and API keys.
        model, embed: What to load and compute (the same options as esm2cli embed).
        loader: Builds the engine (default: build_engine(model, embed)); tests may slow it down.
        on_load_failure: Called when loading fails (the CLI stops the server with exit code 1).
    """
    state = _State()
    metrics = ServerMetrics()
    cache = EmbeddingCache(serve.cache_size, embed, f"{model.model}:{model.dtype}:{model.load_format}")
    metrics.watch_cache(cache)
    loader = loader or (lambda: build_engine(model, embed, BatchConfig(max_tokens=serve.max_tokens)))
    model_id = public_model_name(model.model)
    keys = KeyChecker(serve.api_keys, public_metrics=serve.public_metrics, public_docs=serve.public_docs)

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
        # Windows of long proteins are stitched from their residues' vectors, so every batch brings them back.
        submit = (
            partial(setup.engine.submit, per_token=True) if embed.long_sequences == "window" else setup.engine.submit
        )
        batcher = DynamicBatcher(
            submit,
            max_batch=serve.max_batch_size if serve.batching else serve.max_client_batch,
            max_wait_s=serve.max_wait_ms / 1000,
            max_tokens=setup.batch.max_tokens,
            max_queue=serve.max_queue,
            max_in_flight=2 * len(setup.engine.devices),  # one running and one ready per replica
            coalesce=serve.batching,
            stats=BatcherStats(on_batch=metrics.batch_size.observe),
        )
        batcher.start()
        metrics.watch_devices(setup.engine.busy_seconds)
        metrics.watch_queue(lambda: batcher.pending, lambda: batcher.waiting)
        state.setup, state.batcher, state.status = setup, batcher, "ok"
        log.info("ready: %s on %s", setup.model.source, ", ".join(setup.engine.devices))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        AcceptErrorLimiter.install(asyncio.get_running_loop())
        if not keys.enabled:
            log.warning("no API key is set: the server answers anyone who can reach it (see --api-key)")
        loading = asyncio.create_task(load())  # the port opens now; /health says 503 until this is done
        yield
        await asyncio.gather(loading, return_exceptions=True)
        if state.batcher:
            await state.batcher.stop()
        if state.setup:
            state.setup.engine.close()

    app = FastAPI(title="esm2cli", version=__version__, lifespan=lifespan)
    app.state.serve = serve  # read by esm2cli.serve.connections.uvicorn_config
    app.state.model_id = model_id
    app.state.metrics = metrics  # the connection layer counts what it closes here
    app.add_middleware(
        RequestGuard,
        keys=keys,
        metrics=metrics,
        endpoints=ENDPOINTS,
        max_body_bytes=serve.max_body_bytes,
        body_timeout_s=serve.body_timeout_s,
    )

    @app.exception_handler(Esm2Error)
    async def _esm2_error(request: Request, exc: Esm2Error) -> Response:
        return _json_error(request, http_status(exc), str(exc), type(exc).__name__, getattr(exc, "param", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return _json_error(request, 422, message, "InputError", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # FastAPI's answer to a body it cannot parse: ours is 422, with the reason
            return _json_error(request, 422, _body_error(exc.__cause__), "InputError")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        response = _json_error(request, exc.status_code, message, "HTTPError")
        response.headers.update(exc.headers or {})  # Allow, on 405
        return response

    def _ready() -> tuple[EngineSetup, DynamicBatcher]:
        if state.status != "ok" or state.setup is None or state.batcher is None:
            loading = state.status == "loading"
            raise NotReadyError("the model is still loading" if loading else "the model failed to load")
        if not state.setup.engine.healthy:
            raise EngineError("a device worker has died; the server must be restarted")
        return state.setup, state.batcher

    async def _embed(
        items: list[tuple[str, str | None]], labels: list[str], request: Request
    ) -> list[tuple[int, dict]]:
        """Validates, batches and embeds; returns (residues before truncation, {layer: vector}) per item.

        Raises:
            ClientDisconnectedError: The client left first; its sequences were dropped from the queue.
            RequestTimeoutError: Not answered within --request-timeout.
        """
        _, batcher = _ready()
        checked = [
            _checked(seq, rec_id, where, serve, embed) for (seq, rec_id), where in zip(items, labels, strict=True)
        ]
        _check_fits([s for s, _ in checked], serve, embed)
        cached = [cache.get(s) for s, _ in checked]
        todo = [i for i, row in enumerate(cached) if row is None]
        if not todo:
            return [(length, row) for (_, length), row in zip(checked, cached, strict=True)]
        plan = WindowPlan(embed, [checked[i][0] for i in todo])
        work = asyncio.ensure_future(batcher.embed(plan.items))
        gone = asyncio.ensure_future(_until_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=serve.request_timeout_s, return_when="FIRST_COMPLETED")
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # the batcher drops what was not yet submitted, and cancels batches only it needed
        if work in done:
            for i, row in zip(todo, plan.rows(work.result()), strict=True):
                cached[i] = row
                cache.put(checked[i][0], row)
            return [(length, row) for (_, length), row in zip(checked, cached, strict=True)]
        if gone in done:
            raise ClientDisconnectedError("the client closed the connection before the answer was ready")
        raise RequestTimeoutError(f"not answered within {serve.request_timeout_s:g} s; retry later")

    def _answer(item: SequenceIn, length: int, row: dict, layers: tuple[int, ...]) -> EmbeddingOut:
        truncated = length > embed.truncate and embed.long_sequences != "window"
        windows = len(window_starts(length, embed.truncate, embed.window_overlap)) if not truncated else 1
        common = dict(id=item.id, length=length, truncated=truncated, windows=windows)
        if len(layers) == 1:
            return EmbeddingOut(**common, embedding=row[layers[0]].tolist())
        return EmbeddingOut(**common, embeddings={f"l{layer}": row[layer].tolist() for layer in layers})

    async def _embed_items(items: list[SequenceIn], labels: list[str], request: Request) -> list[EmbeddingOut]:
        rows = await _embed([(item.sequence, item.id) for item in items], labels, request)
        layers = state.setup.layers
        return [_answer(item, length, row, layers) for item, (length, row) in zip(items, rows, strict=True)]

    errors = {status: {"model": ErrorOut} for status in (401, 413, 422, 429, 503)}  # what the OpenAPI page documents

    @app.get("/health", responses={503: {"description": "Loading, failed, or a worker died"}})
    async def health() -> Response:
        """Readiness: 200 once every replica is loaded and warm, 503 before (and if a worker dies). Open to probes."""
        body = {"status": state.status, "model": model_id, "version": __version__}
        if state.status == "failed":
            body["error"] = "the model failed to load (the server log says why)"
        if state.status != "ok" or state.setup is None:
            return _plain_json(body, 503)
        from esm2cli.runtime.devices import cuda_device_count

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
        return _plain_json(body, 200 if engine.healthy else 503)

    @app.get("/live", responses={503: {"description": "Loading failed or a worker died"}})
    async def live() -> Response:
        """Liveness: 200 while the process serves or is still loading; 503 once it cannot recover. Open to probes."""
        dead = state.status == "failed" or (state.setup is not None and not state.setup.engine.healthy)
        return _plain_json({"status": "dead" if dead else "alive"}, 503 if dead else 200)

    for path, probe in (("/health", health), ("/live", live)):  # HEAD too, for probes that use it
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.post("/predict", response_model=EmbeddingOut, responses=errors)
    async def predict(body: SequenceIn, request: Request) -> EmbeddingOut:
        """Embeds one sequence."""
        (answer,) = await _embed_items([body], [_label("sequence", body)], request)
        return answer

    @app.post("/predict/batch", response_model=BatchOut, responses=errors)
    async def predict_batch(body: BatchIn, request: Request) -> BatchOut:
        """Embeds up to --max-client-batch sequences; answers in request order."""
        if len(body.sequences) > serve.max_client_batch:
            raise InputError(f"batch size {len(body.sequences)} > maximum allowed batch size {serve.max_client_batch}")
        if not body.sequences:
            raise InputError("sequences: empty list")
        items = [SequenceIn(sequence=s) if isinstance(s, str) else s for s in body.sequences]
        labels = [_label(f"sequences[{i}]", item) for i, item in enumerate(items)]
        return BatchOut(results=await _embed_items(items, labels, request))

    def _vector_info() -> tuple[int, int]:
        setup, _ = _ready()
        return setup.layers[-1], setup.model.hidden_size

    from esm2cli.model.architecture import resolve_source

    app.include_router(
        openai_router(
            model_id=model_id,
            accepted_names=frozenset({model_id, model.model, resolve_source(model.model)}),
            embed=_embed,
            vector_info=_vector_info,
            max_client_batch=serve.max_client_batch,
            tokens_of=lambda length: model_tokens(length, embed),
        ),
        responses=errors,
    )

    @app.get("/metrics", responses={401: {"model": ErrorOut}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (needs a key unless --public-metrics)."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _plain_json(body: dict, status: int) -> Response:
    return Response(encode(body), status_code=status, media_type="application/json")


def _warm_up(setup: EngineSetup) -> None:
    """Runs one small batch on every replica, so that /health turns 200 only when each is warm."""
    setup.engine.warm_up([WARMUP_SEQUENCE])
