"""/v1/embeddings and /v1/models on a live server, through the official openai client and raw HTTP."""

import base64
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from live_server import (
    live_server,
    make_app,
    wait_healthy,
)

from esm2cli.config import EmbedConfig
from reference import cosine

KEY = "k-openai-0123456789abcdef"


SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ", "mkv la\nW*", "M" * 70]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    app = make_app(tiny_model_dir, devices="sim:2", api_keys=(KEY,), max_wait_ms=2, max_client_batch=8)
    with (
        live_server(app) as url,
        httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {KEY}"}) as c,
    ):
        wait_healthy(c)
        yield url, c, Path(tiny_model_dir).name


@pytest.fixture(scope="module")
def client(served):
    url, _, _ = served
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_client_gets_the_vectors_of_predict_batch(served, client, direct, encoding_format):
    _, http, model_id = served
    answer = client.embeddings.create(model=model_id, input=SEQS, encoding_format=encoding_format)
    assert [d.index for d in answer.data] == list(range(len(SEQS)))
    assert answer.model == model_id and answer.object == "list"
    if encoding_format == "base64":  # asked for explicitly, the client hands the strings over as they are
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in answer.data])
    else:
        got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    batch = http.post("/predict/batch", json={"sequences": SEQS}).json()["results"]
    want = np.array([r["embedding"] for r in batch], dtype=np.float32)
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
    assert cosine(got[0], direct.mean(SEQS[0])).min() >= 0.9999
    assert cosine(got[2], direct.mean("MKVLAW")).min() >= 0.9999  # normalised as /predict does
    tokens = sum(r["length"] + 2 for r in batch)  # residues plus <cls> and <eos>
    assert answer.usage.prompt_tokens == tokens and answer.usage.total_tokens == tokens


def test_the_client_default_is_base64_and_it_is_little_endian_float32(served, client):
    _, http, model_id = served
    raw = http.post("/v1/embeddings", json={"model": model_id, "input": SEQS[0], "encoding_format": "base64"}).json()
    as_floats = http.post("/v1/embeddings", json={"model": model_id, "input": SEQS[0]}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, as_floats["data"][0]["embedding"], atol=1e-6)
    default = client.embeddings.create(model=model_id, input=SEQS[0])  # the client asks for base64 itself
    assert np.allclose(default.data[0].embedding, decoded, atol=1e-6)


def test_a_single_string_and_the_model_listing(served, client):
    _, http, model_id = served
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id] and models.data[0].owned_by == "esm2cli"
    assert client.models.retrieve(model_id).id == model_id
    single = client.embeddings.create(model=model_id, input="MKV", encoding_format="float")
    assert len(single.data) == 1 and single.usage.prompt_tokens == 5


def test_tokens_are_counted_after_truncation(tiny_model_dir):
    app = make_app(tiny_model_dir, embed=EmbedConfig(truncate=50))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        wait_healthy(http)
        model_id = Path(tiny_model_dir).name
        body = http.post("/v1/embeddings", json={"model": model_id, "input": ["M" * 70, "MKV"]}).json()
    assert body["usage"] == {"prompt_tokens": 52 + 5, "total_tokens": 52 + 5}


def test_errors_with_the_openai_client(served, client):
    _, _, model_id = served
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.embeddings.create(model=model_id, input=["MKV", "MKJV"])
    assert "input[1]" in str(info.value) and "outside the ESM-2 alphabet" in str(info.value)
    with pytest.raises(openai.UnprocessableEntityError, match="gives 32-dimensional"):
        client.embeddings.create(model=model_id, input="MKV", dimensions=16)
    assert len(client.embeddings.create(model=model_id, input="MKV", dimensions=32).data[0].embedding) == 32
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="text-embedding-3-small", input="MKV")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="k-wrong-0123456789abcd", max_retries=0).models.list()


V1_INVALID = [
    ({"input": "MKV"}, 422, "model", "model: Field required"),
    ({"model": "M", "input": []}, 422, "input", "input: empty list"),
    ({"model": "M", "input": ["MKV"] * 9}, 422, "input", "batch size 9 > maximum allowed batch size 8"),
    ({"model": "M", "input": [1, 2, 3]}, 422, "input", "Input should be a valid string"),
    ({"model": "M", "input": "MKV", "encoding_format": "int8"}, 422, "encoding_format", "'float' or 'base64'"),
    ({"model": "M", "input": "MKV", "dimensions": 31}, 422, "dimensions", "dimensions: 31 is not available"),
    ({"model": "M", "input": ""}, 422, None, "input: empty sequence"),
    ({"model": "nope", "input": "MKV"}, 404, "model", "the model 'nope' does not exist"),
]


@pytest.mark.parametrize("payload, status, param, message", V1_INVALID)
def test_v1_errors_take_openais_shape_and_name_the_field(served, payload, status, param, message):
    _, http, model_id = served
    if payload.get("model") == "M":
        payload = {**payload, "model": model_id}
    answer = http.post("/v1/embeddings", json=payload)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert message in error["message"] and error["param"] == param
