"""The ESM-2 and ESM C sizes, their configs and the bundled ESM-2 tokenizer: no weights, no hub."""

from __future__ import annotations

from importlib import resources

import torch
from transformers import EsmConfig, EsmTokenizer

# The six ESM-2 sizes: alias -> (layers, hidden size, attention heads). The feed-forward is 4x hidden.
ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M": (6, 320, 20),
    "esm2_t12_35M": (12, 480, 20),
    "esm2_t30_150M": (30, 640, 20),
    "esm2_t33_650M": (33, 1280, 20),
    "esm2_t36_3B": (36, 2560, 40),
    "esm2_t48_15B": (48, 5120, 40),
}
# The three ESM C sizes: alias -> (hub id, layers, hidden size, attention heads, SwiGLU hidden size).
ESMC_ARCHITECTURES: dict[str, tuple[str, int, int, int, int]] = {
    "esmc_300m": ("biohub/ESMC-300M", 30, 960, 15, 2560),
    "esmc_600m": ("biohub/ESMC-600M", 36, 1152, 18, 3072),
    "esmc_6b": ("biohub/ESMC-6B", 80, 2560, 40, 6912),
}
# Residues a protein may have in one forward: the training context less <cls> and <eos>.
ESM2_CONTEXT = 1022
ESMC_CONTEXT = 2046
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_source(model: str) -> str:
    """Maps a short alias (esm2_t33_650M, esm2_t33_650M_UR50D, esmc_300m) to its hub id; returns others as given."""
    if model.lower() in ESMC_ARCHITECTURES:
        return ESMC_ARCHITECTURES[model.lower()][0]
    name = model.removesuffix("_UR50D")
    if name in ARCHITECTURES:
        return f"facebook/{name}_UR50D"
    return model


def esm2_architecture(layers: int, hidden: int, heads: int, **overrides) -> EsmConfig:
    """An ESM-2 config of any size: rotary positions, token dropout, a 4x feed-forward, the 33-token vocabulary."""
    params = dict(
        vocab_size=33,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        token_dropout=True,
        emb_layer_norm_before=False,
        layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        mask_token_id=32,
        pad_token_id=1,
    )
    params.update(overrides)
    return EsmConfig(**params)


def esm2_config(alias: str) -> EsmConfig:
    """The Hugging Face config of one of the six ESM-2 sizes, built without a download."""
    return esm2_architecture(*ARCHITECTURES[alias])


def bundled_tokenizer() -> EsmTokenizer:
    """The ESM-2 tokenizer from the vocabulary shipped with esm2cli (the same 33 tokens as the hub's)."""
    vocab = resources.files("esm2cli.model").joinpath("esm_vocab.txt")
    with resources.as_file(vocab) as path:
        return EsmTokenizer(vocab_file=str(path))


def esmc_alias(model: str) -> str | None:
    """The alias of a named ESM C size (esmc_300m, its hub id biohub/ESMC-300M, or a path ending in either)."""
    stem = model.rstrip("/").split("/")[-1].lower().replace("-", "_")
    return stem if stem in ESMC_ARCHITECTURES else None


def context_of(family: str) -> int:
    """Residues a protein may have in one forward of a model family (its training context)."""
    return ESMC_CONTEXT if family == "esmc" else ESM2_CONTEXT
