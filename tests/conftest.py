"""Shared fixtures: a tiny real ESM-2 built by the session, FASTA writers, a FakeEmbedder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
    differ clearly and a comparison can fail; the LM head's bias is nonzero for the same reason.
    """
    from transformers import EsmForMaskedLM

    from esm2cli.model.architecture import bundled_tokenizer, esm2_architecture

    torch.manual_seed(seed)
    model = EsmForMaskedLM(esm2_architecture(**TINY, initializer_range=0.2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)  # non-trivial norms, so that a skipped norm shows
        # The LM head's output bias starts at zero; a nonzero one makes a score test fail when it is dropped.
        model.lm_head.bias.add_(torch.randn_like(model.lm_head.bias) * 0.5)
    model.save_pretrained(path)
    bundled_tokenizer().save_pretrained(path)
    return str(path)


FAIR_ESM_NAME = "esm2_t3_tiny_UR50D"  # fair-esm picks its ESM-2 loader by the "esm2" prefix of the file name


def write_fair_esm_checkpoint(
    folder: Path, name: str = FAIR_ESM_NAME, layers: int = 3, hidden: int = 32, heads: int = 4, seed: int = 3,
    regression: bool = True,
) -> Path:  # fmt: skip
    """Saves a random ESM-2 built with fair-esm's own ESM2 class, in the layout of fair-esm's downloads.

    ``{"model": encoder.sentence_encoder.* and encoder.lm_head.* weights, "cfg": {"model": Namespace}}``,
    and ``<name>-contact-regression.pt`` beside it, as fair-esm's hub loader expects.
    """
    import argparse

    from esm.model.esm2 import ESM2

    torch.manual_seed(seed)
    model = ESM2(num_layers=layers, embed_dim=hidden, attention_heads=heads, alphabet="ESM-1b", token_dropout=True)
    with torch.no_grad():  # wider than the default init, so that different sequences differ clearly
        for pname, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "layer_norm" in pname else 0.05))
    state = model.state_dict()
    weights = {}
    for key, value in state.items():
        if key.startswith("contact_head."):
            continue
        prefix = "encoder." if key.startswith("lm_head.") else "encoder.sentence_encoder."
        weights[prefix + key] = value.clone()
    args = argparse.Namespace(
        _name="esm2", encoder_layers=layers, encoder_embed_dim=hidden, encoder_ffn_embed_dim=4 * hidden,
        encoder_attention_heads=heads, token_dropout=True, attention_dropout=0.0, dropout=0.0, max_positions=1024,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pt"
    torch.save({"model": weights, "cfg": {"model": args, "task": argparse.Namespace(_name="masked_lm")},
                "args": None, "extra_state": {"epoch": 1}}, path)  # fmt: skip
    if regression:
        contact = {k: v.clone() for k, v in state.items() if k.startswith("contact_head.")}
        torch.save({"model": contact}, folder / f"{name}-contact-regression.pt")
    return path


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

        from esm2cli.io.schema import Embeddings

        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in seqs:
            raise RuntimeError(f"boom on {self.device.name}")
        self.seen.append(list(seqs))
        out = np.zeros((len(seqs), self.hidden), dtype=np.float32)
        out[:, 0] = [len(s) for s in seqs]
        out[:, 1] = [sum(map(ord, s)) % 1000 for s in seqs]
        return Embeddings({0: out}, {})
