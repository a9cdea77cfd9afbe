"""Helpers shared by test modules (fixtures stay in conftest.py): packing, random proteins, a tiny random ESM C
saved with transformers, and transformers' ESM C one protein at a time."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from esm2cli.model.packed import PackedBatch

# Lengths chosen to mix: one attention group per length class, padding inside groups, a 1-residue protein.
MIXED_LENGTHS = [1, 5, 17, 40, 41, 120, 7, 300, 64]


def random_seqs(lengths: Sequence[int] = MIXED_LENGTHS, seed: int = 3) -> list[str]:
    """Random residue strings of the given lengths."""
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)) for n in lengths]


def pack(loaded, seqs: Sequence[str], masked=None, token_dropout: bool = True) -> PackedBatch:
    """Packs residue strings with a LoadedModel's tokens."""
    return PackedBatch.from_sequences(
        seqs, loaded.token_lut, cls_id=loaded.cls_id, eos_id=loaded.eos_id, mask_id=loaded.mask_id,
        token_dropout=token_dropout, masked=masked,
    )  # fmt: skip


def header_offsets(data: bytes) -> list[int]:
    """The byte offset of every record's '>' (a '>' opening a line), found straight in the file's bytes."""
    return [i for i in range(len(data)) if data[i : i + 1] == b">" and (i == 0 or data[i - 1 : i] == b"\n")]


def byte_shard_sizes(source: bytes | str | os.PathLike, count: int) -> list[int]:
    """Records per shard when shard i owns the records whose '>' lies in bytes [i*size/count, (i+1)*size/count)."""
    data = source if isinstance(source, bytes) else open(source, "rb").read()
    sizes = [0] * count
    for offset in header_offsets(data):
        sizes[next(i for i in range(count) if offset < (i + 1) * len(data) // count)] += 1
    return sizes


TINY_ESMC = dict(layers=3, hidden=64, heads=4, ffn=96)


def build_tiny_esmc(path, seed: int = 5, *, layers=3, hidden=64, heads=4, ffn=96, encoder_only=False) -> str:
    """Saves a small ESM C (transformers' EsmcForMaskedLM, or EsmcModel alone) with random weights.

    Weights are drawn wider than the default init and the norms moved off 1, so that different proteins
    differ clearly and a skipped or misplaced norm shows.
    """
    from transformers import EsmcConfig, EsmcForMaskedLM, EsmcModel

    torch.manual_seed(seed)
    config = EsmcConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
        initializer_range=0.1,
    )  # fmt: skip
    model = (EsmcModel if encoder_only else EsmcForMaskedLM)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return str(path)


class EsmcReference:
    """transformers' own ESM C, each protein alone, tokenised by its EsmcTokenizer."""

    def __init__(self, model_dir: str):
        from transformers import EsmcForMaskedLM, EsmcTokenizer

        self.tokenizer = EsmcTokenizer()
        self.model = EsmcForMaskedLM.from_pretrained(model_dir).eval()
        self.num_layers = self.model.config.num_hidden_layers

    def _ids(self, seq: str, masked: int | None = None) -> torch.Tensor:
        ids = self.tokenizer(seq, return_tensors="pt")["input_ids"]
        if masked is not None:
            ids[0, masked + 1] = self.tokenizer.mask_token_id
        return ids

    def hidden(self, seq: str, layer: int) -> np.ndarray:
        with torch.no_grad():
            states = self.model.esmc(input_ids=self._ids(seq), output_hidden_states=True).hidden_states
        return states[layer % (self.num_layers + 1)][0].numpy()

    def mean(self, seq: str, layer: int = -1) -> np.ndarray:
        return self.hidden(seq, layer)[1 : len(seq) + 1].mean(0)

    def bos(self, seq: str, layer: int = -1) -> np.ndarray:
        return self.hidden(seq, layer)[0]

    def per_token(self, seq: str, layer: int = -1) -> np.ndarray:
        return self.hidden(seq, layer)[1 : len(seq) + 1]

    def log_probs(self, seq: str, masked: int | None = None) -> np.ndarray:
        """(residues, 64) log-softmax of the LM head at each residue, with residue ``masked`` (0-based) masked."""
        with torch.no_grad():
            logits = self.model(input_ids=self._ids(seq, masked)).logits[0, 1 : len(seq) + 1]
        return torch.log_softmax(logits, dim=-1).numpy()

    def token(self, residue: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(residue)
