"""Shared fixtures: a tiny real ESM-2 built by the session, FASTA writers, a FakeEmbedder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch


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


TINY = dict(layers=3, hidden=32, heads=4)


def build_tiny_esm2(path, seed: int = 7) -> str:
    """Saves a small ESM-2 (real architecture and tokenizer, random weights) with save_pretrained.

    The weights are drawn wider than the default init so that embeddings of different sequences
    differ clearly and a comparison can fail.
    """
    from transformers import EsmForMaskedLM

    from esm2cli.model import bundled_tokenizer, esm2_architecture

    torch.manual_seed(seed)
    model = EsmForMaskedLM(esm2_architecture(**TINY, initializer_range=0.2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)  # non-trivial norms, so that a skipped norm shows
    model.save_pretrained(path)
    bundled_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny_esm2(tmp_path_factory.mktemp("tiny-esm2"))


@pytest.fixture(scope="session")
def proteins() -> list[tuple[str, str]]:
    """Synthetic proteins of realistic lengths (a few over 1022 residues)."""
    from esm2cli.workload import synthetic_sequences

    return list(synthetic_sequences(40, seed=11, max_length=1200))


def write_fasta(path, records: Sequence[tuple[str, str]], width: int = 60) -> str:
    with open(path, "w", encoding="utf-8") as out:
        for rec_id, seq in records:
            out.write(f">{rec_id}\n")
            out.writelines(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
    return str(path)


@dataclass
class FakeDevice:
    name: str


class FakeEmbedder:
    """Sets v[0] = len(seq), so order and padding bugs show; records which batches it ran."""

    def __init__(self, name: str, fail_on: str | None = None, delay: float = 0.0, hidden: int = 4):
        self.device = FakeDevice(name)
        self.fail_on = fail_on
        self.delay = delay
        self.hidden = hidden
        self.seen: list[list[str]] = []

    def embed_batch(self, seqs):
        import time

        from esm2cli.model import BatchEmbeddings

        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in seqs:
            raise RuntimeError(f"boom on {self.device.name}")
        self.seen.append(list(seqs))
        out = np.zeros((len(seqs), self.hidden), dtype=np.float32)
        out[:, 0] = [len(s) for s in seqs]
        out[:, 1] = [sum(map(ord, s)) % 1000 for s in seqs]
        return BatchEmbeddings({0: out}, {})
