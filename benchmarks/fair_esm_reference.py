"""fair-esm (facebookresearch/esm) as the reference implementation of ESM-2 embeddings, scores and contacts.

Maps the weights of a Hugging Face ESM-2 checkpoint onto fair-esm's own ESM2 model code and runs
the loop of fair-esm's ``scripts/extract.py`` (``esm-extract --include mean``): its FASTA
reader, its length-sorted token batches, its batch converter with truncation, and the mean over
positions ``1 : truncate_len + 1``. For scores, the hand-written loop of fair-esm's variant-prediction
example (``examples/variant-prediction/predict.py``): one masked copy per forward pass, log-softmax
over the vocabulary. For contacts, ``model(tokens, return_contacts=True)``. Used by the tests and the
benchmarks.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from esm import Alphabet, FastaBatchedDataset
from esm.model.esm2 import ESM2
from torch import nn
from transformers import EsmForMaskedLM, EsmModel

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
    (r"contact_head\.regression\.", "contact_head.regression."),
]
# The masked-LM head (EsmForMaskedLM.lm_head, or a head passed beside an encoder); its decoder is tied to
# the token embeddings in both models, so fair-esm's lm_head.weight needs no entry of its own.
_LM_HEAD_MAP = [
    (r"dense\.", "lm_head.dense."),
    (r"layer_norm\.", "lm_head.layer_norm."),
    (r"bias$", "lm_head.bias"),
]
# fair-esm parameters with no entry of their own: lm_head.weight (the token embeddings, tied) and the
# rotary frequencies (recomputed).
_TIED = re.compile(r"^(lm_head\.weight|layers\.\d+\.self_attn\.rot_emb\.inv_freq)$")


def _rename(state: dict[str, torch.Tensor], table: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in table:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value.detach().clone().float()
                break
    return out


def fair_esm_state_dict(
    hf_model: EsmModel | EsmForMaskedLM, lm_head: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Renames an EsmModel's weights (and an LM head's, if given or inside an EsmForMaskedLM) to fair-esm's names."""
    if isinstance(hf_model, EsmForMaskedLM):
        hf_model, lm_head = hf_model.esm, hf_model.lm_head
    out = _rename(hf_model.state_dict(), _LAYER_MAP)
    if lm_head is not None:
        out.update(_rename(lm_head.state_dict(), _LM_HEAD_MAP))
    return out


def fair_esm_model(hf_model: EsmModel | EsmForMaskedLM, lm_head: nn.Module | None = None) -> tuple[ESM2, Alphabet]:
    """Builds fair-esm's ESM2 with the weights of a Hugging Face model, in float32 eval mode.

    The LM head and the contact head are mapped when the Hugging Face model carries them (an
    EsmForMaskedLM, an encoder with its contact head, or ``lm_head`` given beside the encoder);
    the load then checks that nothing else is left out.
    """
    if isinstance(hf_model, EsmForMaskedLM):
        hf_model, lm_head = hf_model.esm, hf_model.lm_head
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
    state = fair_esm_state_dict(hf_model, lm_head)
    result = model.load_state_dict(state, strict=False)
    absent = [
        prefix for prefix, head in [("lm_head.", lm_head), ("contact_head.", hf_model.contact_head)] if head is None
    ]
    unexpected_missing = [k for k in result.missing_keys if not _TIED.match(k) and not k.startswith(tuple(absent))]
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


def _tokens(alphabet: Alphabet, seqs: list[str]) -> torch.Tensor:
    _, _, toks = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    return toks


def masked_log_probs(model: ESM2, alphabet: Alphabet, seq: str, position: int) -> torch.Tensor:
    """log p(. | seq with ``position`` (0-based) masked) over the vocabulary: one masked copy, one forward pass."""
    toks = _tokens(alphabet, [seq]).to(next(model.parameters()).device)
    toks[0, position + 1] = alphabet.mask_idx
    with torch.no_grad():
        return torch.log_softmax(model(toks)["logits"][0, position + 1].float(), dim=-1)


def masked_log_probs_batch(model: ESM2, alphabet: Alphabet, items: list[tuple[str, int]]) -> torch.Tensor:
    """The same as masked_log_probs for many (sequence, position) pairs in one padded fair-esm batch: (items, vocab)."""
    toks = _tokens(alphabet, [seq for seq, _ in items])
    positions = torch.tensor([pos + 1 for _, pos in items])
    rows = torch.arange(len(items))
    toks[rows, positions] = alphabet.mask_idx
    with torch.no_grad():
        return torch.log_softmax(model(toks)["logits"][rows, positions].float(), dim=-1)


def unmasked_log_probs(model: ESM2, alphabet: Alphabet, seq: str) -> torch.Tensor:
    """log p(. | seq) at every residue, (length, vocabulary): the wild-type marginal."""
    with torch.no_grad():
        logits = model(_tokens(alphabet, [seq]))["logits"][0, 1 : len(seq) + 1]
    return torch.log_softmax(logits.float(), dim=-1)


def pseudo_log_likelihood(model: ESM2, alphabet: Alphabet, seq: str) -> float:
    """The sum over residues of log p(x_i | seq with i masked), one masked copy per forward pass."""
    return sum(masked_log_probs(model, alphabet, seq, i)[alphabet.get_idx(aa)].item() for i, aa in enumerate(seq))


def contacts(model: ESM2, alphabet: Alphabet, seqs: list[str]) -> list[torch.Tensor]:
    """fair-esm's contact maps for a batch, ``return_contacts=True``: one (length, length) tensor per sequence."""
    with torch.no_grad():
        maps = model(_tokens(alphabet, seqs), return_contacts=True)["contacts"]
    return [maps[i, : len(s), : len(s)] for i, s in enumerate(seqs)]
