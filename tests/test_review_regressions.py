"""Defects an adversarial review of main found (empty key variable, --truncate over the model's positions,
DataFrames and 0-d arrays, UTF-16 bodies, key files with a byte-order mark, embed_fasta after close): each
test asserts the behaviour that should be, and failed before its fix."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from live_server import live_server, make_app, wait_healthy

from esm2cli.config import EmbedConfig
from esm2cli.errors import EngineError, InputError
from reference import DirectReference


def _long_protein(n: int) -> str:
    rng = random.Random(n)
    return "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(n))


# ---------------------------------------------------------------------------------------------------------
# serve


def test_an_empty_api_keys_variable_refuses_to_serve(tiny_model_dir, tmp_path, reap):
    # A Kubernetes Secret whose key is empty renders ESM2CLI_API_KEYS="" (the variable is set): the user
    # asked for keys, as with an empty --api-key-file, which exits 2. Here the server starts without any.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "ESM2CLI_API_KEYS": ""}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "esm2cli", "serve", "-m", tiny_model_dir, "--devices", "cpu", "--port", "0"],
            stderr=log, env=env,
        )  # fmt: skip
    reap(proc)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if "Uvicorn running" in log_path.read_text():
            break  # it serves: the defect
        time.sleep(0.05)
    assert proc.poll() == 2, f"the server started without keys: {log_path.read_text()[-500:]}"


def test_a_utf16_body_is_422_as_documented(tiny_model_dir):
    app = make_app(tiny_model_dir, max_wait_ms=1)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        body = '{"sequence": "MKTAYIAKQR"}'.encode("utf-16")  # a BOM, then UTF-16-LE
        answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert "UTF-8" in answer.json()["error"]


def test_a_key_file_with_a_byte_order_mark_gives_its_key(tmp_path):
    from esm2cli.serve.auth import checked_keys, read_key_file

    key = "k3y-" + "a" * 28
    path = tmp_path / "keys"
    path.write_bytes(b"\xef\xbb\xbf" + key.encode() + b"\r\n")  # as Windows editors save it
    assert checked_keys(read_key_file(path)) == (key,)


# ---------------------------------------------------------------------------------------------------------
# --truncate over the model's positions: worked before the packed forward (285db5d embeds 1,500 residues)


def test_truncate_over_the_model_positions_embeds_or_is_refused_up_front(tiny_model_dir, tmp_path):
    seq = _long_protein(1500)
    fasta = tmp_path / "long.fa"
    fasta.write_text(f">long\n{seq}\n")
    out = tmp_path / "out.parquet"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "esm2cli", "embed", str(fasta), "-o", str(out), "-m", tiny_model_dir]
    args += ["--devices", "cpu", "--dtype", "float32", "--truncate", "2000", "-q"]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    # Rotary ESM-2 embeds it whole, as transformers' EsmModel does (the rotary table grows past 1,026).
    assert run.returncode == 0, run.stderr
    table = pq.read_table(out).to_pydict()
    assert table["length"] == [1500] and table["truncated"] == [False]
    want = DirectReference(tiny_model_dir).mean(seq)
    np.testing.assert_allclose(np.asarray(table["embedding"][0]), want, atol=1e-4)


def test_serve_with_truncate_over_the_model_positions_never_answers_500(tiny_model_dir):
    app = make_app(tiny_model_dir, embed=EmbedConfig(truncate=2000), max_wait_ms=1)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        answer = client.post("/predict", json={"sequence": _long_protein(1500)})
        # a configuration problem is the operator's (refuse to start) or the request's (422), never a 500
        assert answer.status_code in (200, 422), answer.text


# ---------------------------------------------------------------------------------------------------------
# Python API


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    from esm2cli import Embedder

    with Embedder(tiny_model_dir, devices="cpu", dtype="float32") as e:
        yield e


def test_embed_refuses_a_dataframe(embedder):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"sequence": ["MKTAYIAKQR", "GSHMLEDPV", "MKV"]})
    # Iterating a DataFrame yields its column labels, as iterating a dict yields its keys (which is refused).
    with pytest.raises(InputError, match="DataFrame"):
        embedder.embed(frame)


def test_embed_of_a_zero_dimensional_array_is_one_sequence_or_input_error(embedder):
    try:
        vector = embedder.embed(np.array("MKTAYIAKQR"))
    except InputError:
        return
    assert vector.shape == (embedder.hidden_size,)


def test_embed_fasta_to_a_file_after_close_leaves_nothing(tiny_model_dir, tmp_path):
    from esm2cli import Embedder

    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    embedder = Embedder(tiny_model_dir, devices="cpu", dtype="float32")
    embedder.close()
    with pytest.raises(EngineError):
        embedder.embed_fasta(fasta, tmp_path / "out.parquet")
    left = sorted(p.name for p in Path(tmp_path).iterdir() if not re.fullmatch(r"in\.fa", p.name))
    assert left == [], left
