"""Shared fixtures: a tiny ESM-2 and ESM C built once a session, proteins, a clean environment (helpers: helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import build_tiny_esm2


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No ESM2CLI_* setting of the developer's leaks into a test; the hub is never contacted."""
    for key in list(os.environ):
        if key.startswith("ESM2CLI_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _torch_settings():
    """torch's process-wide settings as each test found them, whatever the test (or code it ran) changed.

    A CPU replica's worker sets its thread count with torch.set_num_threads, which also sets the count every
    thread started later begins with: after an embed on ``--devices auto`` (one single-threaded replica per
    core) or ``sim:N``, a later test's new threads ran on one thread, not torch's default.
    """
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    precision, deterministic = torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_float32_matmul_precision(precision)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture
def reap():
    """Call with each process a test starts: whatever still runs when the test ends (failed or not) is killed."""
    procs = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny_esm2(tmp_path_factory.mktemp("tiny-esm2"))


@pytest.fixture(scope="session")
def tiny_esmc_dir(tmp_path_factory) -> str:
    """A tiny random ESM C (with its LM head) saved by transformers' EsmcForMaskedLM."""
    from helpers import build_tiny_esmc

    return build_tiny_esmc(tmp_path_factory.mktemp("tiny-esmc"))


@pytest.fixture(scope="session")
def proteins() -> list[tuple[str, str]]:
    """Synthetic proteins of realistic lengths (a few over 1022 residues)."""
    from esm2cli.jobs.workload import synthetic_sequences

    return list(synthetic_sequences(40, seed=11, max_length=1200))


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    """transformers' own ESM-2 over the tiny model, one protein at a time: what the server's answers must match."""
    from reference import DirectReference

    return DirectReference(tiny_model_dir)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A live server of the tiny model on loopback without a key (live_server.PLAIN): its httpx client."""
    from live_server import PLAIN, serving

    with serving(tiny_model_dir, **PLAIN) as (_, client):
        yield client


@pytest.fixture(scope="module")
def guarded(tiny_model_dir):
    """A live server of the tiny model behind API keys and bounds (live_server.GUARDED): (url, httpx client)."""
    from live_server import GUARDED, serving

    with serving(tiny_model_dir, **GUARDED) as (url, client):
        yield url, client
