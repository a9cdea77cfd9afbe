"""The HTTP API: create_app(...) -> FastAPI, with /health, /live, /predict, /predict/batch, /v1, /search and /metrics.

The routes are thin: parsing, and the shapes of errors and answers. What happens between a parsed request
and its answer (readiness, checks, the cache, batching, the client leaving, timeouts) is
esm2cli.serve.service.EmbeddingService's.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig, __version__
from esm2cli.errors import Esm2Error, InputError, http_status
from esm2cli.runtime.engine import EngineSetup
from esm2cli.serve.auth import KeyChecker
from esm2cli.serve.cache import OPEN_PARTITION
from esm2cli.serve.connections import AcceptErrorLimiter
from esm2cli.serve.guard import CLIENT_SCOPE_KEY, RequestGuard
from esm2cli.serve.http_errors import encode, error_headers, error_payload
from esm2cli.serve.metrics import ServerMetrics
from esm2cli.serve.openai_routes import openai_router
from esm2cli.serve.search_routes import SearchDatabase, search_router
from esm2cli.serve.service import EmbeddingOut, EmbeddingService, Item, Row, SequenceIn, label

log = logging.getLogger(__name__)

ENDPOINTS = frozenset(
    {"/health", "/live", "/predict", "/predict/batch", "/metrics", "/v1/embeddings", "/v1/models", "/search"}
)


class BatchIn(BaseModel):
    sequences: list[SequenceIn | str] = Field(description="At most --max-client-batch sequences")


class BatchOut(BaseModel):
    results: list[EmbeddingOut]


class ErrorOut(BaseModel):
    error: str
    error_type: str


# What the OpenAPI page documents for the embedding routes.
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorOut} for status in (401, 413, 422, 429, 503)}


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


def _plain_json(body: dict, status: int) -> Response:
    return Response(encode(body), status_code=status, media_type="application/json")


async def _until_disconnected(receive) -> None:
    """Returns when the client has closed its connection (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _client(request: Request) -> bytes:
    """The cache partition of the request's API key (set by the guard)."""
    return request.scope.get(CLIENT_SCOPE_KEY, OPEN_PARTITION)


def _add_error_handlers(app: FastAPI) -> None:
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


def _add_probes(app: FastAPI, service: EmbeddingService) -> None:
    @app.get("/health", responses={503: {"description": "Loading, failed, or a worker died"}})
    async def health() -> Response:
        """Readiness: 200 once every replica is loaded and warm, 503 before (and if a worker dies). Open to probes."""
        return _plain_json(*service.health())

    @app.get("/live", responses={503: {"description": "Loading failed or a worker died"}})
    async def live() -> Response:
        """Liveness: 200 while the process serves or is still loading; 503 once it cannot recover. Open to probes."""
        return _plain_json(*service.live())

    for path, probe in (("/health", health), ("/live", live)):  # HEAD too, for probes that use it
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)


def _add_embedding_routes(app: FastAPI, service: EmbeddingService) -> None:
    max_client_batch = service.serve.max_client_batch

    @app.post("/predict", response_model=EmbeddingOut, responses=ERRORS)
    async def predict(body: SequenceIn, request: Request) -> EmbeddingOut:
        """Embeds one sequence."""
        disconnected = partial(_until_disconnected, request.receive)
        (answer,) = await service.embed_items(
            [body], [label("sequence", body)], client=_client(request), disconnected=disconnected
        )
        return answer

    @app.post("/predict/batch", response_model=BatchOut, responses=ERRORS)
    async def predict_batch(body: BatchIn, request: Request) -> BatchOut:
        """Embeds up to --max-client-batch sequences; answers in request order."""
        if len(body.sequences) > max_client_batch:
            raise InputError(f"batch size {len(body.sequences)} > maximum allowed batch size {max_client_batch}")
        if not body.sequences:
            raise InputError("sequences: empty list")
        items = [SequenceIn(sequence=s) if isinstance(s, str) else s for s in body.sequences]
        labels = [label(f"sequences[{i}]", item) for i, item in enumerate(items)]
        disconnected = partial(_until_disconnected, request.receive)
        answers = await service.embed_items(items, labels, client=_client(request), disconnected=disconnected)
        return BatchOut(results=answers)

    async def embed(items: list[Item], labels: list[str], request: Request) -> list[tuple[int, Row]]:
        disconnected = partial(_until_disconnected, request.receive)
        return await service.embed(items, labels, client=_client(request), disconnected=disconnected)

    from esm2cli.model.architecture import resolve_source

    model = service.model.model
    app.include_router(
        openai_router(
            model_id=service.model_id,
            accepted_names=frozenset({service.model_id, model, resolve_source(model)}),
            embed=embed,
            vector_info=service.vector_info,
            max_client_batch=max_client_batch,
            tokens_of=service.tokens_of,
        ),
        responses=ERRORS,
    )


def _add_search_route(app: FastAPI, service: EmbeddingService, database: SearchDatabase | None) -> None:
    async def embed(items: list[Item], labels: list[str], request: Request) -> list[tuple[int, Row]]:
        disconnected = partial(_until_disconnected, request.receive)
        return await service.embed(items, labels, client=_client(request), disconnected=disconnected)

    router = search_router(database=database, embed=embed, ready=service.ready, serve=service.serve)
    app.include_router(router, responses={**ERRORS, 404: {"model": ErrorOut}})


def create_app(
    serve: ServeConfig,
    model: ModelConfig,
    embed: EmbedConfig,
    loader: Callable[[], EngineSetup] | None = None,
    on_load_failure: Callable[[Exception], None] | None = None,
    *,
    index: str | os.PathLike | None = None,
) -> FastAPI:
    """Builds the app; its lifespan loads the engine in the background and owns it.

    Args:
        serve: Bounds, batching and API keys.
        model, embed: What to load and compute (the same options as esm2cli embed).
        loader: Builds the engine (default: build_server_engine(model, embed, serve)); tests may slow it down.
        on_load_failure: Called when loading fails (the CLI stops the server with exit code 1).
        index: The search database POST /search answers from (None: /search answers 404). It is opened and its
            identity checked once the model is loaded; a database of other vectors fails the load.
    """
    metrics = ServerMetrics()
    search = SearchDatabase(index, embed, metrics) if index is not None else None
    service = EmbeddingService(serve, model, embed, metrics=metrics, loader=loader, on_load_failure=on_load_failure,
                               check_loaded=search.check_loaded if search else None)  # fmt: skip
    keys = KeyChecker(serve.api_keys, public_metrics=serve.public_metrics, public_docs=serve.public_docs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        AcceptErrorLimiter.install(asyncio.get_running_loop())
        if not keys.enabled:
            log.warning("no API key is set: the server answers anyone who can reach it (see --api-key)")
        loading = asyncio.create_task(service.load())  # the port opens now; /health says 503 until this is done
        yield
        await asyncio.gather(loading, return_exceptions=True)
        await service.stop()

    app = FastAPI(title="esm2cli", version=__version__, lifespan=lifespan)
    app.state.serve = serve  # read by esm2cli.serve.connections.uvicorn_config
    app.state.model_id = service.model_id
    app.state.metrics = metrics  # the connection layer counts what it closes here
    app.state.service = service
    app.add_middleware(
        RequestGuard,
        keys=keys,
        metrics=metrics,
        endpoints=ENDPOINTS,
        max_body_bytes=serve.max_body_bytes,
        body_timeout_s=serve.body_timeout_s,
    )
    _add_error_handlers(app)
    _add_probes(app, service)
    _add_embedding_routes(app, service)
    _add_search_route(app, service, search)

    @app.get("/metrics", responses={401: {"model": ErrorOut}})
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus metrics (needs a key unless --public-metrics); the cache's counts are the caller's key's own."""
        return Response(metrics.render(_client(request)), media_type="text/plain; version=0.0.4")

    return app
