"""OpenAI-compatible routes: POST /v1/embeddings and GET /v1/models, for OpenAI's own clients.

The embeddings are those of /predict/batch (same checks, same dynamic batching); only the request
and answer shapes are OpenAI's. ``base64`` is the little-endian float32 bytes of each vector, as
OpenAI encodes it (and as its Python client asks by default). Errors under /v1 take OpenAI's shape
(esm2cli.serve.http_errors).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from esm2cli.errors import InputError, NotFoundError

# (sequence, id) pairs with their labels for messages -> (residues before truncation, {layer: vector}) each
EmbedFn = Callable[[list[tuple[str, str | None]], list[str], Request], Awaitable[list[tuple[int, dict]]]]


class EmbeddingsIn(BaseModel):
    input: str | list[str] = Field(description="One protein sequence, or a list of at most --max-client-batch")
    model: str = Field(description="The served model's id, as GET /v1/models lists it")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: the little-endian float32 bytes of each vector"
    )
    dimensions: int | None = Field(default=None, description="Only the model's own size is available")
    user: str | None = Field(default=None, description="Accepted and ignored")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = Field(
        description="Tokens the model saw: residues after truncation (or in windows), plus <cls> and <eos> each"
    )
    total_tokens: int


class EmbeddingsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "esm2cli"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openai_router(
    *,
    model_id: str,
    accepted_names: frozenset[str],
    embed: EmbedFn,
    vector_info: Callable[[], tuple[int, int]],
    max_client_batch: int,
    tokens_of: Callable[[int], int],
) -> APIRouter:
    """Builds the /v1 routes.

    Args:
        model_id: The id /v1/models lists and answers carry.
        accepted_names: Values of ``model`` that name the served model (its id, alias, hub id).
        embed: The server's embedding path (validation, batching, disconnect handling).
        vector_info: Returns (the layer answered, the vector size) once the model is loaded; raises while loading.
        max_client_batch: Inputs per request at most.
        tokens_of: Tokens the model sees for a sequence of so many residues (after truncation or in windows).
    """
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
    created = int(time.time())
    card = ModelCard(id=model_id, created=created)

    @router.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The served model, as OpenAI lists models."""
        return ModelList(data=[card])

    @router.get("/models/{model:path}", response_model=ModelCard)
    async def get_model(model: str) -> ModelCard:
        """One model by id (404 for any but the served one)."""
        if model not in accepted_names:
            raise NotFoundError(f"the model {model!r} does not exist; this server has {model_id!r}", param="model")
        return card

    @router.post("/embeddings", response_model=EmbeddingsOut)
    async def embeddings(body: EmbeddingsIn, request: Request) -> Response:
        """Embeds one sequence or a list of them; the vectors are those of /predict/batch."""
        if body.model not in accepted_names:
            raise NotFoundError(f"the model {body.model!r} does not exist; this server has {model_id!r}", param="model")
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs:
            raise InputError("input: empty list", param="input")
        if len(inputs) > max_client_batch:
            raise InputError(f"batch size {len(inputs)} > maximum allowed batch size {max_client_batch}", param="input")
        layer, size = vector_info()
        if body.dimensions is not None and body.dimensions != size:
            raise InputError(
                f"dimensions: {body.dimensions} is not available; {model_id} gives {size}-dimensional embeddings",
                param="dimensions",
            )
        labels = ["input" if isinstance(body.input, str) else f"input[{i}]" for i in range(len(inputs))]
        rows = await embed([(seq, None) for seq in inputs], labels, request)
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(row[layer], body.encoding_format)}
            for i, (_, row) in enumerate(rows)
        ]
        tokens = sum(tokens_of(length) for length, _ in rows)
        answer = {
            "object": "list",
            "data": data,
            "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        # Serialised here: the vectors are checked already, and a response model would copy them once more.
        return Response(json.dumps(answer).encode(), media_type="application/json")

    return router


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
