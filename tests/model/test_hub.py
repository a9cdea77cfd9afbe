"""esm2cli download, the Hugging Face cache, and offline runs that fail at once (a hub on loopback; no internet)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from fake_hub import FakeHub

from esm2cli.cli import cli
from esm2cli.config import ModelConfig
from esm2cli.errors import ModelLoadError
from esm2cli.model.load import load_model
from helpers import write_fair_esm_checkpoint, write_fasta

REPO = "facebook/esm2_t6_8M_UR50D"  # served by the fake hub with the tiny model's weights
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub_repo(tmp_path, tiny_model_dir) -> Path:
    """The tiny model as a hub repository holds it: several weight formats, a README."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_dir, repo)
    (repo / "pytorch_model.bin").write_bytes(b"not needed: the safetensors are enough")
    (repo / "tf_model.h5").write_bytes(b"not needed either")
    (repo / "README.md").write_text("model card")
    return repo


@pytest.fixture
def caches(tmp_path, monkeypatch) -> Path:
    """Empty Hugging Face and torch hub caches, online (conftest sets HF_HUB_OFFLINE=1 for everything else)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    return tmp_path / "hf" / "hub"


@pytest.fixture
def fasta(tmp_path) -> str:
    return write_fasta(tmp_path / "in.fa", [("a", "MKTAYIAKQR"), ("b", "GSHMLEDPV"), ("c", "W")])


def run(*args, expect=0):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == expect, result.output
    return result


def embeddings(path) -> np.ndarray:
    return np.array(pq.read_table(path)["embedding"].to_pylist(), dtype=np.float32)


def test_download_once_then_embed_offline_from_the_cache(tmp_path, hub_repo, caches, fasta, tiny_model_dir,
                                                         monkeypatch):  # fmt: skip
    with FakeHub({REPO: hub_repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = run("download", "esm2_t6_8M")
        folder = Path(result.stdout.strip())
        assert folder.is_relative_to(caches) and (folder / "config.json").is_file()
        fetched = sorted(p.rsplit("/", 1)[1] for method, p in hub.requests if method == "GET" and "/resolve/" in p)
        assert fetched == ["config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt"]  # one format
        asked = len(hub.requests)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        run("embed", fasta, "-o", str(tmp_path / "hub.parquet"), "-m", "esm2_t6_8M", "--dtype", "float32", "-q")
        monkeypatch.delenv("HF_HUB_OFFLINE")  # online, a cached model is still loaded without asking the hub
        run("embed", fasta, "-o", str(tmp_path / "again.parquet"), "-m", "esm2_t6_8M", "--dtype", "float32", "-q")
        assert len(hub.requests) == asked
    run("embed", fasta, "-o", str(tmp_path / "dir.parquet"), "-m", tiny_model_dir, "--dtype", "float32", "-q")
    np.testing.assert_array_equal(embeddings(tmp_path / "hub.parquet"), embeddings(tmp_path / "dir.parquet"))
    np.testing.assert_array_equal(embeddings(tmp_path / "again.parquet"), embeddings(tmp_path / "dir.parquet"))


def test_download_to_a_shared_folder(tmp_path, hub_repo, caches, fasta, monkeypatch):
    shared = tmp_path / "shared"
    with FakeHub({REPO: hub_repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = run("download", REPO, "--to", str(shared))
    folder = shared / "esm2_t6_8M_UR50D"
    assert result.stdout.strip() == str(folder)
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert not list(caches.rglob("blobs/*"))  # not also in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run("embed", fasta, "-o", str(tmp_path / "o.parquet"), "-m", str(folder), "--dtype", "float32", "-q")
    assert run("download", REPO, "--to", str(shared)).stdout.strip() == str(folder)  # offline: already there


def test_download_of_an_unknown_model(hub_repo, caches, monkeypatch):
    with FakeHub({REPO: hub_repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = run("download", "someone/no-such-model", expect=1)
    assert "someone/no-such-model: no such model on the Hugging Face hub" in result.output
    result = run("download", "./not/a/model", expect=2)
    assert "not an ESM-2 alias or a hub id" in result.output


def test_offline_and_not_cached_fails_with_how_to_get_it(caches, fasta, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("download", "esm2_t6_8M", expect=1)
    assert "HF_HUB_OFFLINE=1 is set" in result.output
    result = run("embed", fasta, "-o", str(tmp_path / "o.parquet"), "-m", "esm2_t6_8M", "-q", expect=1)
    (line,) = result.output.strip().splitlines()
    assert f"{REPO} is not in the Hugging Face cache ({caches})" in line
    assert "run `esm2cli download esm2_t6_8M`" in line


class _Hangup:
    """A TCP server that accepts and closes each connection at once: a hub that cannot be reached. Counts tries."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def test_unreachable_hub_is_tried_once(caches, fasta, tmp_path, monkeypatch):
    hangup = _Hangup()
    monkeypatch.setenv("HF_ENDPOINT", hangup.url)
    try:
        result = run("embed", fasta, "-o", str(tmp_path / "o.parquet"), "-m", "esm2_t6_8M", "-q", expect=1)
    finally:
        hangup.sock.close()
    assert hangup.connections == 1  # one request, no retries
    assert f"the hub cannot be reached at {hangup.url}" in result.output


def test_unreachable_hub_in_a_real_process_one_message_no_retries(tmp_path, fasta):
    """As a user sees it: one message on stderr, no retries, no warning printed twice."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ESM2CLI_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "t"))
    env["PYTHONPATH"] = str(ROOT)  # this checkout's esm2cli
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "esm2cli", "embed", fasta, "-o", str(tmp_path / "o.parquet"), "-m", "esm2_t6_8M"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    # The same interpreter start and imports, without the hub: what the machine's load costs right now.
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import esm2cli.cli, esm2cli.model.load, torch, transformers"],
        env=env, capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    baseline = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot be reached at http://127.0.0.1:9" in errors[0], proc.stderr
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr
    assert len(lines) == len(set(lines)), proc.stderr  # nothing printed twice
    # huggingface_hub's retries alone used to sleep 23 s on top of the start; failing fast adds a few seconds.
    assert seconds < baseline + 10, (seconds, baseline)


def test_alias_falls_back_to_fair_esms_download(caches, monkeypatch):
    """No Hugging Face copy, but fair-esm's own download of the size in the torch hub cache: used, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_fair_esm_checkpoint(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints", name="esm2_t6_8M_UR50D")
    loaded = load_model(ModelConfig(model="esm2_t6_8M", dtype="float32"))
    assert loaded.source == str(path) and loaded.num_layers == 3


def test_a_cached_snapshot_without_weights_is_not_used(caches, monkeypatch, hub_repo):
    with FakeHub({REPO: hub_repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        folder = Path(run("download", REPO).stdout.strip())
    (folder / "model.safetensors").unlink()  # an interrupted download, say
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        load_model(ModelConfig(model="esm2_t6_8M", dtype="float32"))


def test_download_esmc_by_alias_then_embed_it_offline_by_alias(tmp_path, caches, fasta, tiny_esmc_dir, monkeypatch):
    """ESM C is fetched like ESM-2 (biohub/ESMC-300M here serves the tiny ESM C) and then read from the cache."""
    repo = tmp_path / "esmc-repo"
    shutil.copytree(tiny_esmc_dir, repo)
    (repo / "tokenizer.json").write_text("{}")
    with FakeHub({"biohub/ESMC-300M": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        folder = Path(run("download", "esmc_300m").stdout.strip())
        fetched = sorted(p.rsplit("/", 1)[1] for method, p in hub.requests if method == "GET" and "/resolve/" in p)
    assert folder.is_relative_to(caches) and fetched == ["config.json", "model.safetensors", "tokenizer.json"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run("embed", fasta, "-o", str(tmp_path / "hub.parquet"), "-m", "esmc_300m", "--dtype", "float32", "-q")
    run("embed", fasta, "-o", str(tmp_path / "dir.parquet"), "-m", tiny_esmc_dir, "--dtype", "float32", "-q")
    np.testing.assert_array_equal(embeddings(tmp_path / "hub.parquet"), embeddings(tmp_path / "dir.parquet"))
