"""POST /search: the top-k hits of sequences in the search database given to ``esm2cli serve --index DB``.

The query vectors are the server's own (the /predict path: the same checks, the key's cache partition, dynamic
batching, the client leaving, --request-timeout); the database is esm2cli.search.index.Index, opened while the
model loads, and refused at startup when its vectors are of another identity than the server's (the CLI exits 2
naming what differs). Its search runs in a thread, so that /health and the batcher keep answering meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Request
from prometheus_client import Histogram
from pydantic import BaseModel, Field

from esm2cli.config import DEFAULT_TOP_K, MAX_SERVE_TOP_K, EmbedConfig, ServeConfig
from esm2cli.errors import InputError, NotFoundError, NotReadyError, RequestTimeoutError
from esm2cli.io.identity import request_identity
from esm2cli.serve.metrics import ServerMetrics
from esm2cli.serve.service import SequenceIn, label

if TYPE_CHECKING:
    from esm2cli.search.index import Hit, Index

log = logging.getLogger(__name__)

SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# (sequence, id) pairs with their labels for messages -> (residues before truncation, {layer: vector}) each
EmbedFn = Callable[[list[tuple[str, str | None]], list[str], Request], Awaitable[list[tuple[int, dict]]]]


class SearchIn(BaseModel):
    sequences: list[SequenceIn | str] = Field(description="At most --max-client-batch sequences")
    k: int = Field(default=DEFAULT_TOP_K, description=f"Hits per sequence at most (1 to {MAX_SERVE_TOP_K})")
    min_score: float | None = Field(default=None, description="Drop hits of a lower cosine")
    max_evalue: float | None = Field(default=None, description="Drop hits of a higher E-value")


class HitOut(BaseModel):
    target: str = Field(description="The target's id in the database")
    score: float = Field(description="The cosine of the query's and the target's vectors")
    evalue: float | None = Field(description="Decoy hits this good expected in the database (None: no null model)")


class SearchOut(BaseModel):
    results: list[list[HitOut]] = Field(description="One list per sequence, in request order, best hit first")


class SearchDatabase:
    """The database a server searches: opened and checked once the model is loaded (check_loaded).

    Args:
        path: The database folder (``--index``).
        embed: The server's embedding options (the identity of its vectors).
        metrics: Where the time spent searching is shown.
    """

    def __init__(self, path: str | os.PathLike, embed: EmbedConfig, metrics: ServerMetrics):
        self.path = str(path)
        self.embed = embed
        self.opened: tuple[Index, int] | None = None  # the index and the server's layer its vectors are of
        self.seconds = Histogram(
            "esm2cli_search_seconds", "Seconds /search spent in the database (the vectors computed)",
            buckets=SEARCH_BUCKETS, registry=metrics.registry,
        )  # fmt: skip

    def check_loaded(self, setup, weights: str) -> None:
        """Opens the database (every file checked against its manifest) and refuses it when its vectors are of
        another identity than the server computes (ConfigError, naming what differs); in the loading thread."""
        from esm2cli.search.index import Index
        from esm2cli.search.vectors import vector_identity

        index = Index.open(self.path)
        wanted = int(index.identity["layer"])
        layer = wanted if wanted in setup.layers else setup.layers[-1]  # another layer: named as what differs
        served = request_identity(weights=weights, dtype=setup.dtype, embed=self.embed, model_family=setup.model.family)
        index.check_query_identity(vector_identity({"identity": served}, layer), "the server's model and options")
        self.opened = index, layer
        log.info("search database: %s (%s, %s vectors)", self.path, index.kind, f"{index.size:,}")


def search_router(
    *,
    database: SearchDatabase | None,
    embed: EmbedFn,
    ready: Callable[[], object],
    serve: ServeConfig,
) -> APIRouter:
    """Builds POST /search (404 without a database).

    Args:
        database: The server's database, or None (``esm2cli serve`` without ``--index``).
        embed: The server's embedding path (validation, the cache, batching, disconnect handling).
        ready: Raises while the server is not ready (503) or a worker died (500).
        serve: Bounds: --max-client-batch, --request-timeout.
    """
    router = APIRouter(tags=["search"])

    @router.post("/search", response_model=SearchOut)
    async def search(body: SearchIn, request: Request) -> SearchOut:
        """The k best database targets of each sequence, embedded as /predict/batch embeds them."""
        start = time.perf_counter()
        index, layer = _open(database, ready)
        _check(body, index, serve.max_client_batch)
        items = [SequenceIn(sequence=s) if isinstance(s, str) else s for s in body.sequences]
        pairs = [(item.sequence, item.id) for item in items]
        rows = await embed(pairs, [label(f"sequences[{i}]", item) for i, item in enumerate(items)], request)
        vectors = np.stack([row[layer] for _, row in rows])
        left = serve.request_timeout_s - (time.perf_counter() - start)
        with database.seconds.time():  # type: ignore[union-attr]  # _open refused a server without one
            hits = await _within(left, serve.request_timeout_s, _searched(index, vectors, body))
        return SearchOut(results=[[HitOut(target=h.target, score=h.score, evalue=h.evalue) for h in row]
                                  for row in hits])  # fmt: skip

    return router


def _searched(index: Index, vectors: np.ndarray, body: SearchIn) -> Awaitable[list[list[Hit]]]:
    """The index's search in a thread: the event loop answers /health and feeds the batcher meanwhile (FAISS
    takes per-call search parameters, so threads may share one index)."""
    return asyncio.to_thread(index.search_vectors, vectors, body.k, min_score=body.min_score,
                             max_evalue=body.max_evalue)  # fmt: skip


def _open(database: SearchDatabase | None, ready: Callable[[], object]) -> tuple[Index, int]:
    """The open index and the layer its vectors are of; 404 without a database, 503 while loading."""
    if database is None:
        raise NotFoundError("POST /search: this server has no search database (start it with --index DB)")
    ready()
    if database.opened is None:
        raise NotReadyError("the search database is still opening")
    return database.opened


def _check(body: SearchIn, index: Index, max_client_batch: int) -> None:
    """Refuses, before any sequence is embedded, what /predict/batch refuses and a k or filter the database cannot
    answer (422). The database's path is never named: the server's paths stay private."""
    if len(body.sequences) > max_client_batch:
        raise InputError(f"batch size {len(body.sequences)} > maximum allowed batch size {max_client_batch}")
    if not body.sequences:
        raise InputError("sequences: empty list", param="sequences")
    most = min(index.size, MAX_SERVE_TOP_K)
    if not 1 <= body.k <= most:
        raise InputError(f"k: {body.k} is out of range: ask for 1 to {most:,} hits (the database holds "
                         f"{index.size:,} vectors; a request gets {MAX_SERVE_TOP_K:,} at most)", param="k")  # fmt: skip
    if body.max_evalue is not None and not index.has_evalues:
        raise InputError("max_evalue: the database has no null model (built with --decoys 0): no E-values",
                         param="max_evalue")  # fmt: skip


async def _within(left: float, timeout: float, work: Awaitable):
    """The search's result, unless --request-timeout (``timeout``, of which ``left`` remains) passes first. The
    thread cannot be stopped; it finishes a search no one reads, bounded by k and the sequences per request."""
    try:
        return await asyncio.wait_for(work, max(left, 0.0))
    except TimeoutError:
        raise RequestTimeoutError(f"not answered within {timeout:g} s; retry later") from None
