"""fair-esm (facebookresearch/esm) as the reference implementation of ESM-2 embeddings.

Maps the weights of a Hugging Face ESM-2 checkpoint onto fair-esm's own ESM2 model code and runs
the loop of fair-esm's ``scripts/extract.py`` (``esm-extract --include mean``): its FASTA
reader, its length-sorted token batches, its batch converter with truncation, and the mean over
positions ``1 : truncate_len + 1``. Used by the tests and the side-by-side benchmark.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from esm import Alphabet, FastaBatchedDataset
from esm.model.esm2 import ESM2
from transformers import EsmModel

_LAYER_MAP = [
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.self_attn.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.self_attn.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.self_attn.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.LayerNorm\.", r"layers.\1.self_attn_layer_norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.fc2."),
    (r"encoder\.layer\.(\d+)\.LayerNorm\.", r"layers.\1.final_layer_norm."),
    (r"encoder\.emb_layer_norm_after\.", "emb_layer_norm_after."),
    (r"embeddings\.word_embeddings\.", "embed_tokens."),
]
# fair-esm parameters that a Hugging Face encoder does not carry; none of them touches the representations.
_NOT_MAPPED = re.compile(r"^(lm_head\.|contact_head\.|layers\.\d+\.self_attn\.rot_emb\.inv_freq$)")


def fair_esm_state_dict(hf_model: EsmModel) -> dict[str, torch.Tensor]:
    """Renames an EsmModel's encoder weights to fair-esm's ESM2 names."""
    out = {}
    for key, value in hf_model.state_dict().items():
        for pattern, repl in _LAYER_MAP:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value.detach().clone().float()
                break
    return out


def fair_esm_model(hf_model: EsmModel) -> tuple[ESM2, Alphabet]:
    """Builds fair-esm's ESM2 with the weights of a Hugging Face EsmModel, in float32 eval mode."""
    cfg = hf_model.config
    if cfg.intermediate_size != 4 * cfg.hidden_size:
        raise ValueError("fair-esm's ESM2 has a 4x feed-forward; this model does not")
    alphabet = Alphabet.from_architecture("ESM-1b")
    model = ESM2(
        num_layers=cfg.num_hidden_layers,
        embed_dim=cfg.hidden_size,
        attention_heads=cfg.num_attention_heads,
        alphabet=alphabet,
        token_dropout=cfg.token_dropout,
    )
    result = model.load_state_dict(fair_esm_state_dict(hf_model), strict=False)
    unexpected_missing = [k for k in result.missing_keys if not _NOT_MAPPED.match(k)]
    if unexpected_missing or result.unexpected_keys:
        raise ValueError(f"weight mapping is incomplete: {unexpected_missing} {result.unexpected_keys}")
    return model.eval(), alphabet


def extract_mean(
    model: ESM2,
    alphabet: Alphabet,
    fasta: str | Path,
    repr_layers: list[int] | None = None,
    toks_per_batch: int = 4096,
    truncation_seq_length: int = 1022,
) -> dict[str, dict[int, torch.Tensor]]:
    """fair-esm's extraction loop with ``--include mean``: {first word of header: {layer: mean}}."""
    repr_layers = repr_layers or [-1]
    layers = [(i + model.num_layers + 1) % (model.num_layers + 1) for i in repr_layers]
    dataset = FastaBatchedDataset.from_file(fasta)
    batches = dataset.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(truncation_seq_length), batch_sampler=batches
    )
    out: dict[str, dict[int, torch.Tensor]] = {}
    with torch.no_grad():
        for labels, strs, toks in loader:
            reps = model(toks, repr_layers=layers, return_contacts=False)["representations"]
            for i, label in enumerate(labels):
                n = min(truncation_seq_length, len(strs[i]))
                out[label.split()[0]] = {layer: t[i, 1 : n + 1].mean(0).clone() for layer, t in reps.items()}
    return out
