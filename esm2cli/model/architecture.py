"""The ESM-2 and ESM C sizes, their configs and the bundled ESM-2 tokenizer: no weights, no hub."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import EsmConfig, EsmTokenizer

from esm2cli.errors import ConfigError

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
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
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
    params: dict[str, Any] = dict(
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


def model_family(model: str) -> str:
    """ "esmc" or "esm2" for a model as named, without loading it: an alias, or the ``model_type`` of a local
    directory's config.json or of a hub model's config in the cache (a hub model not cached yet: "esm2",
    and its loading says otherwise once it is read)."""
    if esmc_alias(model) is not None:
        return "esmc"
    if resolve_source(model) != model:  # an ESM-2 alias
        return "esm2"
    config = Path(model).expanduser() / "config.json"
    if not config.is_file() and _REPO_ID.match(model):
        try:
            from huggingface_hub import try_to_load_from_cache

            from esm2cli.model.hub import cache_dir

            found = try_to_load_from_cache(model, "config.json", cache_dir=cache_dir())
        except Exception:  # a name the hub client refuses is not a cached model either
            found = None
        config = Path(found) if isinstance(found, str) else config
    try:
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        model_type = None
    return "esmc" if model_type == "esmc" else "esm2"


def resolve_truncate(model: str, truncate: int | None, *, window: str | None = None) -> int:
    """The residues kept per protein: ``truncate`` as given, else the model's own context (1,022 for ESM-2,
    2,046 for ESM C).

    ``window`` is how the caller's user asks for windows (``--long-sequences window``), named in the refusal as
    the other remedy; None where windows are not available or already asked for (advice that cannot work is
    worse than none).

    ESM-2's rotary positions extend past its context (a longer --truncate embeds the protein whole, as
    transformers does); ESM C's context is refused past 2,046 residues, the length it was trained on.

    Raises:
        ConfigError: ``truncate`` is over ESM C's context.
    """
    family = model_family(model)
    if truncate is None:
        return context_of(family)
    if family == "esmc" and truncate > ESMC_CONTEXT:
        remedy = f", or {window}" if window else ""
        raise ConfigError(
            f"--truncate {truncate} is over ESM C's context of {ESMC_CONTEXT} residues ({model}): "
            f"use --truncate {ESMC_CONTEXT} or less{remedy}"
        )
    return truncate
