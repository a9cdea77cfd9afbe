"""The project's own ESM-2 inference forward: packed (padding-free), one fused QKV matmul, pooling on the device.

A batch is its proteins' tokens concatenated, ``<cls> residues <eos>`` each, with cumulative lengths
(``cu_seqlens``); no pad token is ever computed. Every layer runs on the packed ``(tokens, hidden)`` matrix;
attention alone needs the proteins apart:

- CUDA, bf16/fp16: torch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``).
- otherwise (the CPU, fp32 on CUDA): the proteins grouped by length, each group gathered to its widest member
  and run through ``scaled_dot_product_attention`` with a key mask (exact: masked keys weigh 0). The groups,
  like every index the forward uses, are planned on the host before the batch starts.
- contact maps: attention probabilities written out per protein (softmax(QK^T)), folded into the contact
  logits layer by layer (symmetrise, APC, the regression weights), as the ESM-2 contact head defines them.

The computation is ESM-2's as fair-esm and transformers define it: token-dropout scaling of the embeddings
(mask tokens zeroed, the rest scaled by 0.88 / (1 - mask share of the protein)), pre-LayerNorm layers,
queries scaled by head_dim^-0.5 (folded into the fused QKV weight), rotary embeddings from one table
gathered by position (0 is <cls>), exact-erf GELU, the final LayerNorm (``emb_layer_norm_after``), the LM
head (dense, GELU, LayerNorm, decoder tied to the token embeddings, bias) and the contact head.

Hidden-state indices are transformers' ``hidden_states``: 0 the embeddings, k (1..n-1) the raw output of
layer k, n the output after the final LayerNorm (``last_hidden_state``).

Imports only torch, numpy and the standard library: it never calls transformers at run time (``from_hf``
only reads an already loaded transformers model's weights), so it can be used with transformers' ESM
layers unavailable.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esm2cli.config import POOLINGS
from esm2cli.io.schema import Embeddings
from esm2cli.model.invariant import mean_pool, pad_rows, tiled_linear
from esm2cli.model.packed import (
    DeviceBatch,
    PackedBatch,
    host_to_device,
    split_host,
    to_device,
)

log = logging.getLogger(__name__)
_ROTARY_LOCK = threading.Lock()

# ----------------------------------------------------------------------------------------------------------
# The model


class _Layer(nn.Module):
    """One ESM-2 layer's weights: pre-LN attention with a fused QKV projection, pre-LN GELU feed-forward."""

    def __init__(self, hidden: int, ffn: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ln1_w = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.ln1_b = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.qkv_w = nn.Parameter(torch.empty(3 * hidden, hidden), requires_grad=False)
        self.qkv_b = nn.Parameter(torch.empty(3 * hidden), requires_grad=False)
        self.out_w = nn.Parameter(torch.empty(hidden, hidden), requires_grad=False)
        self.out_b = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.ln2_w = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.ln2_b = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.fc1_w = nn.Parameter(torch.empty(ffn, hidden), requires_grad=False)
        self.fc1_b = nn.Parameter(torch.empty(ffn), requires_grad=False)
        self.fc2_w = nn.Parameter(torch.empty(hidden, ffn), requires_grad=False)
        self.fc2_b = nn.Parameter(torch.empty(hidden), requires_grad=False)


def _copy(dst: nn.Parameter, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.data = src.detach().to(dst.dtype).clone()


class PackedEsm2(nn.Module):
    """ESM-2 inference on packed batches; built from a loaded transformers model by ``from_hf``.

    Attributes:
        num_layers, hidden_size, num_heads, head_dim: The architecture.
        mask_id: The <mask> token id; token_dropout: the config's flag.
        has_lm_head, has_contact_head: Which heads were copied.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int,
        max_positions: int,
        eps: float,
        token_dropout: bool,
        mask_id: int,
        emb_layer_norm_before: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.num_heads, self.head_dim, self.eps = num_heads, hidden_size // num_heads, eps
        self.max_positions, self.token_dropout, self.mask_id = max_positions, token_dropout, mask_id
        with torch.device("meta"):  # shapes only; from_hf fills every tensor
            self.tok_embed = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)
            self.layers = nn.ModuleList([_Layer(hidden_size, ffn_size, eps) for _ in range(num_layers)])
        # Parameters and buffers, so that .to(device) moves them with the rest (None: not in this checkpoint).
        if emb_layer_norm_before:
            self.emb_ln_w: nn.Parameter | None = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
            self.emb_ln_b: nn.Parameter | None = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        else:
            self.register_parameter("emb_ln_w", None)
            self.register_parameter("emb_ln_b", None)
        self.final_ln_w = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.final_ln_b = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.lm: nn.ParameterDict | None = None
        self.lm_eps = eps
        self.lm_decoder_tied = True
        self.contact_w: torch.Tensor | None
        self.register_buffer("contact_w", None)  # (layers * heads,) float32, layer-major
        self.contact_b: float = 0.0
        self.emb_layer_norm_before = emb_layer_norm_before
        # Batch-invariant (the default): a protein's numbers depend on the protein alone (esm2cli.model.invariant).
        # False runs the batch-dependent forward it replaced, kept to measure what invariance costs.
        self.batch_invariant = True
        self.launched_at = 0.0  # perf_counter() when the last embed had launched its work (before the copy back)
        self.inv_freq: torch.Tensor
        self.rot_cos: torch.Tensor
        self.rot_sin: torch.Tensor
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.register_buffer("rot_cos", torch.empty(0), persistent=False)
        self.register_buffer("rot_sin", torch.empty(0), persistent=False)
        self._retired_tables: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def has_lm_head(self) -> bool:
        return self.lm is not None

    @property
    def has_contact_head(self) -> bool:
        return self.contact_w is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embed.device

    def blocks(self) -> list[_Layer]:
        """The layers, typed (an nn.ModuleList yields plain Modules)."""
        return [layer for layer in self.layers if isinstance(layer, _Layer)]

    @classmethod
    def from_hf(cls, encoder: Any, lm_head: Any = None, contact_head: Any = None) -> PackedEsm2:
        """Copies (and fuses) the weights of a transformers ESM-2 encoder, on its device and in its dtype.

        The transformers modules are only read: they can be dropped afterwards.

        Args:
            encoder: A transformers ``EsmModel`` (rotary positions, as every ESM-2).
            lm_head: Its ``EsmLMHead`` (the decoder tied to the token embeddings), for ``lm_log_probs``.
            contact_head: Its ``EsmContactPredictionHead``, for contact maps (None: ``encoder.contact_head``
                when it has one).

        Returns:
            The packed model, in eval mode, without gradients.
        """
        cfg = encoder.config
        if getattr(cfg, "position_embedding_type", "rotary") != "rotary":
            raise ValueError("only rotary ESM-2 models are supported")
        emb = encoder.embeddings
        dtype = emb.word_embeddings.weight.dtype
        device = emb.word_embeddings.weight.device
        model = cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            ffn_size=cfg.intermediate_size,
            max_positions=cfg.max_position_embeddings,
            eps=cfg.layer_norm_eps,
            token_dropout=bool(cfg.token_dropout),
            mask_id=cfg.mask_token_id,
            emb_layer_norm_before=emb.layer_norm is not None,
            dtype=dtype,
        ).to_empty(device=device)
        model.to(dtype)
        _copy(model.tok_embed, emb.word_embeddings.weight)
        if model.emb_ln_w is not None and model.emb_ln_b is not None:
            _copy(model.emb_ln_w, emb.layer_norm.weight)
            _copy(model.emb_ln_b, emb.layer_norm.bias)
        scaling = model.head_dim**-0.5  # ESM scales the queries before the rotary embedding: fold it in
        for mine, theirs in zip(model.blocks(), encoder.encoder.layer, strict=True):
            att = theirs.attention
            sa = att.self
            _copy(mine.ln1_w, att.LayerNorm.weight)
            _copy(mine.ln1_b, att.LayerNorm.bias)
            qw = sa.query.weight.detach().float() * scaling
            qb = sa.query.bias.detach().float() * scaling
            _copy(mine.qkv_w, torch.cat([qw, sa.key.weight.float(), sa.value.weight.float()]))
            _copy(mine.qkv_b, torch.cat([qb, sa.key.bias.float(), sa.value.bias.float()]))
            _copy(mine.out_w, att.output.dense.weight)
            _copy(mine.out_b, att.output.dense.bias)
            _copy(mine.ln2_w, theirs.LayerNorm.weight)
            _copy(mine.ln2_b, theirs.LayerNorm.bias)
            _copy(mine.fc1_w, theirs.intermediate.dense.weight)
            _copy(mine.fc1_b, theirs.intermediate.dense.bias)
            _copy(mine.fc2_w, theirs.output.dense.weight)
            _copy(mine.fc2_b, theirs.output.dense.bias)
        final = encoder.encoder.emb_layer_norm_after
        _copy(model.final_ln_w, final.weight)
        _copy(model.final_ln_b, final.bias)
        # From the formula, in float32: a model loaded in bf16 holds its inv_freq buffer rounded to bf16.
        model.inv_freq = rotary_inv_freq(model.head_dim, getattr(cfg, "rope_theta", None) or 10000.0).to(device)
        model._rotary_table(model.max_positions)
        if lm_head is not None:
            model.lm = nn.ParameterDict(
                {
                    "dense_w": lm_head.dense.weight,
                    "dense_b": lm_head.dense.bias,
                    "ln_w": lm_head.layer_norm.weight,
                    "ln_b": lm_head.layer_norm.bias,
                    "bias": lm_head.bias,
                }
            )
            for name, p in model.lm.items():
                model.lm[name] = nn.Parameter(p.detach().to(dtype).clone(), requires_grad=False)
            model.lm_eps = lm_head.layer_norm.eps
            # The decoder is tied to the token embeddings in every ESM-2 checkpoint; keep whatever it holds.
            decoder = lm_head.decoder.weight
            model.lm_decoder_tied = decoder.data_ptr() == emb.word_embeddings.weight.data_ptr()
            if not model.lm_decoder_tied:
                model.lm["decoder"] = nn.Parameter(decoder.detach().to(dtype).clone(), requires_grad=False)
        contact_head = contact_head if contact_head is not None else getattr(encoder, "contact_head", None)
        if contact_head is not None:
            reg = contact_head.regression
            model.contact_w = reg.weight.detach().float().reshape(-1).clone()
            model.contact_b = float(reg.bias.detach().float()) if reg.bias is not None else 0.0
        return model.eval().requires_grad_(False)

    def _rotary_table(self, positions: int) -> None:
        """cos and signed sin, (positions, head_dim) float32, as transformers computes them (float32).

        Built in float32 whatever the model's dtype; only the rotated q and k are cast (see _rotate).
        """
        inv_freq = self.inv_freq
        pos = torch.arange(positions, device=inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        half = self.head_dim // 2
        sin = emb.sin()
        sin[:, :half] = -sin[:, :half]  # rotate_half(x) = roll(x, half) * [-1.., +1..]
        self.rot_cos, self.rot_sin = emb.cos(), sin

    # ------------------------------------------------------------------------------------------------------
    # The forward

    def uses_varlen(self) -> bool:
        """True when attention runs through flash varlen (CUDA, bf16/fp16); else padded SDPA groups."""
        return self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16) and _varlen() is not None

    def prepare(self, batch: PackedBatch) -> DeviceBatch:
        """Moves a batch's indices to the model's device, with what its attention path needs."""
        if batch.max_len > self.rot_cos.shape[0]:
            self._extend_rotary(batch.max_len)
        return to_device(batch, self.device, groups=not self.uses_varlen(), invariant=self.batch_invariant)

    def _extend_rotary(self, tokens: int) -> None:
        """Grows the rotary table for a protein longer than the config's positions (``--truncate`` over 1022).

        Rotary positions have no trained limit: transformers computes them for any length, and so does this.
        The old tables stay referenced, because a captured CUDA graph may still read them.
        """
        with _ROTARY_LOCK:  # CPU replicas share this module; the table only ever grows
            if tokens > self.rot_cos.shape[0]:
                self._retired_tables.append((self.rot_cos, self.rot_sin))
                self._rotary_table(max(tokens, 2 * self.rot_cos.shape[0]))

    def _embeddings(self, db: DeviceBatch) -> torch.Tensor:
        x = F.embedding(db.tokens, self.tok_embed)
        if self.token_dropout:
            x = (x.float() * db.scale[:, None]).to(self.dtype)
        if self.emb_ln_w is not None:
            x = F.layer_norm(x, (self.hidden_size,), self.emb_ln_w, self.emb_ln_b, self.eps)
        return x

    def _rotate(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of q and k, in float32 as transformers: (T, 3, heads, head_dim) with v as it is.

        The result stays in float32 where attention is padded SDPA: on the CPU, float32 SDPA is faster than
        bfloat16's (benchmarks/forward_ab.py) and more exact; flash varlen takes the model's dtype.
        """
        qk = qkv[:, :2].float()
        qk = qk * cos + torch.roll(qk, self.head_dim // 2, dims=-1) * sin
        if self.uses_varlen():
            return torch.cat([qk.to(qkv.dtype), qkv[:, 2:]], dim=1)
        return torch.cat([qk, qkv[:, 2:].float()], dim=1)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.batch_invariant:
            return tiled_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def _attend(self, qkv: torch.Tensor, db: DeviceBatch) -> torch.Tensor:
        """Self-attention within each protein: (rows, 3, heads, head_dim) -> (rows, hidden).

        Rows past the batch's tokens (the padding of the last matmul tile) come back zero.
        """
        t = qkv.shape[0]
        real = db.tokens.shape[0]
        varlen = _varlen()
        if varlen is not None and self.uses_varlen():
            # Flash varlen runs each (protein, head, query block) in its own thread block over the protein's
            # keys in order, without splitting the keys by the batch's size: per protein, one fixed sum.
            q, k, v = qkv[:real].unbind(1)
            out = varlen(q, k, v, db.cu_seqlens, db.cu_seqlens, db.max_len, db.max_len, scale=1.0)
            return pad_rows(out.reshape(real, self.hidden_size)) if t > real else out.reshape(t, self.hidden_size)
        out = qkv.new_empty(t, self.hidden_size)  # float32 (see _rotate)
        if t > real:
            out[real:] = 0
        for g in db.groups:
            n, w = g.gather.shape
            # (n, W, 3, heads, D) -> q, k, v each (n, heads, W, D)
            q, k, v = qkv[g.gather.reshape(-1)].view(n, w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.key_mask, scale=1.0)
            o = o.transpose(1, 2).reshape(n * w, self.hidden_size)
            if g.slots is not None:
                o = o[g.slots]
            out[g.dest] = o
        return out.to(self.dtype)

    def _attend_explicit(
        self, qkv: torch.Tensor, db: DeviceBatch, layer: int, logits: list[torch.Tensor]
    ) -> torch.Tensor:
        """Attention with its probabilities written out, one protein at a time, folded into contact logits."""
        out = qkv.new_zeros(qkv.shape[0], self.hidden_size, dtype=self.dtype)  # padding rows stay 0
        heads = self.num_heads
        if self.contact_w is None or db.host is None:
            raise RuntimeError("contacts without the contact head or the host batch; this is a bug")
        weight = self.contact_w[layer * heads : (layer + 1) * heads]
        cu = db.host.cu_seqlens
        for i in range(db.host.num_seqs):
            a, b = int(cu[i]), int(cu[i + 1])
            q, k, v = qkv[a:b].permute(1, 2, 0, 3)  # each (heads, n, D)
            probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # float32 but on CUDA in bf16/fp16
            out[a:b] = (probs @ v).transpose(0, 1).reshape(b - a, self.hidden_size).to(out.dtype)
            maps = probs[:, 1:-1, 1:-1].float()  # residues only: <cls> and <eos> dropped as the head does
            maps = _apc(maps + maps.transpose(-1, -2))
            part = torch.einsum("hij,h->ij", maps, weight)
            logits[i] = part if logits[i] is None else logits[i] + part
        return out

    def _layer(self, x: torch.Tensor, lw: _Layer, db: DeviceBatch, cos, sin, *, contacts=None, index=0) -> torch.Tensor:
        h = F.layer_norm(x, (self.hidden_size,), lw.ln1_w, lw.ln1_b, self.eps)
        qkv = self._linear(h, lw.qkv_w, lw.qkv_b).view(-1, 3, self.num_heads, self.head_dim)
        qkv = self._rotate(qkv, cos, sin)
        if contacts is None:
            a = self._attend(qkv, db)
        else:
            a = self._attend_explicit(qkv, db, index, contacts)
        x = self._linear(a, lw.out_w, lw.out_b).add_(x)
        h = F.layer_norm(x, (self.hidden_size,), lw.ln2_w, lw.ln2_b, self.eps)
        return self._linear(F.gelu(self._linear(h, lw.fc1_w, lw.fc1_b)), lw.fc2_w, lw.fc2_b).add_(x)

    def _run(self, db: DeviceBatch, layers: Sequence[int], visit, contacts=None) -> None:
        """Runs the forward, calling visit(index, hidden) for each hidden state in ``layers`` as it is made."""
        wanted = set(layers)
        last = max(wanted) if wanted else self.num_layers
        if contacts is not None:
            last = self.num_layers
        x = self._embeddings(db)
        cos = self.rot_cos[db.positions][:, None, None, :]  # (T, 1, 1, D): q and k, every head
        sin = self.rot_sin[db.positions][:, None, None, :]
        if self.batch_invariant:  # whole matmul tiles from the start: every layer runs on the padded rows
            x, cos, sin = pad_rows(x), pad_rows(cos), pad_rows(sin)
        if 0 in wanted:
            visit(0, x)
        for index, lw in enumerate(self.blocks()[: min(last, self.num_layers)]):
            x = self._layer(x, lw, db, cos, sin, contacts=contacts, index=index)
            if index + 1 in wanted and index + 1 < self.num_layers:
                visit(index + 1, x)
        if self.num_layers in wanted:
            visit(self.num_layers, self.final_norm(x))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """ESM-2's final LayerNorm (``emb_layer_norm_after``)."""
        return F.layer_norm(x, (self.hidden_size,), self.final_ln_w, self.final_ln_b, self.eps)

    @torch.inference_mode()
    def forward(self, batch: PackedBatch | DeviceBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Packed hidden states, (T, hidden) in the model's dtype, for each layer index asked (0..num_layers).

        Args:
            batch: The batch (a PackedBatch is moved to the device first).
            layers: Hidden-state indices as transformers' ``hidden_states`` (0: embeddings; num_layers: after
                the final LayerNorm).
        """
        db = batch if isinstance(batch, DeviceBatch) else self.prepare(batch)
        check_layers(layers, self.num_layers)
        out: dict[int, torch.Tensor] = {}
        t = db.tokens.shape[0]
        self._run(db, layers, lambda i, h: out.__setitem__(i, h[:t]))  # hidden states are never changed in place
        return out

    def reduce_on_device(
        self, db: DeviceBatch, layers: Sequence[int], pooling: str, per_token: bool, contacts: list | None = None
    ) -> torch.Tensor:
        """The forward with pooling and per-token rows done on the device, as one float32 (rows, hidden) tensor.

        Rows, layer by layer in ``layers`` order: the B pooled vectors, then (per_token) the R residue rows.
        """
        pieces: list[torch.Tensor] = []
        b = db.num_seqs

        def visit(index: int, h: torch.Tensor) -> None:
            hf = h.float()
            if pooling == "mean" and db.pool is not None:
                pooled = mean_pool(hf, db.pool, db.inv_lengths)
            elif pooling == "mean":
                hf = hf[: db.pool_index.shape[0]]
                sums = hf.new_zeros(b + 1, self.hidden_size).index_add_(0, db.pool_index, hf)
                pooled = (sums * db.inv_lengths[:, None])[:b]
            else:
                pooled = hf.index_select(0, db.bos_rows)
            part = [pooled]
            if per_token:
                part.append(hf.index_select(0, db.residue_rows))
            results[index] = part

        results: dict[int, list[torch.Tensor]] = {}
        self._run(db, layers, visit, contacts)
        for layer in layers:
            pieces += results[layer]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    @torch.inference_mode()
    def embed(
        self,
        batch: PackedBatch,
        layers: Sequence[int],
        pooling: str = "mean",
        per_token: bool = False,
        contacts: bool = False,
    ) -> Embeddings:
        """Embeds a packed batch: pooled vectors (and per-residue rows, contact maps) on the host, float32.

        One device-to-host copy per batch of only what is returned (two with contacts).

        Args:
            batch: The packed batch.
            layers: Hidden-state indices (0..num_layers, distinct), as transformers' ``hidden_states``.
            pooling: "mean" over residues (no <cls>, no <eos>) or "bos" (the <cls> token).
            per_token: Also return each protein's residue rows.
            contacts: Also return contact maps (needs the contact head; attention probabilities are written
                out, so this path is slower).

        Returns:
            Embeddings with arrays in the batch's order.
        """
        check_layers(layers, self.num_layers)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}")
        if contacts and not self.has_contact_head:
            raise RuntimeError("contacts asked of a model without its contact head; this is a bug")
        db = self.prepare(batch)
        logits: list | None = [None] * batch.num_seqs if contacts else None
        flat = self.reduce_on_device(db, layers, pooling, per_token, logits)
        self.launched_at = time.perf_counter()  # the host's part ends here: benchmarks read it (host ms a forward)
        return split_host(flat.cpu().numpy(), batch, layers, per_token, self._contacts_host(logits))

    def _contacts_host(self, logits: list | None) -> list[np.ndarray]:
        if logits is None:
            return []
        sizes = [lg.shape[0] for lg in logits]
        flat = torch.cat([torch.sigmoid(lg + self.contact_b).reshape(-1) for lg in logits]).cpu().numpy()
        parts = np.split(flat, np.cumsum([n * n for n in sizes])[:-1])
        return [p.reshape(n, n) for p, n in zip(parts, sizes, strict=True)]

    @torch.inference_mode()
    def lm_log_probs(self, batch: PackedBatch, rows: np.ndarray) -> torch.Tensor:
        """The masked-LM head's log-softmax over the vocabulary at packed rows of the last hidden state.

        Args:
            batch: The packed batch (mask tokens already in place; see PackedBatch.from_sequences).
            rows: Packed row indices to read (see PackedBatch.rows).

        Returns:
            (len(rows), vocab) float32 on the device.
        """
        if self.lm is None:
            raise RuntimeError("lm_log_probs on a model without its LM head; this is a bug")
        db = self.prepare(batch)
        rows_t = host_to_device(np.asarray(rows, dtype=np.int64), self.device)
        picked: list[torch.Tensor] = []
        self._run(db, (self.num_layers,), lambda i, h: picked.append(h.index_select(0, rows_t)))
        lm = self.lm
        x = pad_rows(picked[0]) if self.batch_invariant else picked[0]  # whole tiles: the rows read vary
        return torch.log_softmax(self._lm_logits(x, lm)[: len(rows_t)].float(), dim=-1)

    def _lm_logits(self, x: torch.Tensor, lm: nn.ParameterDict) -> torch.Tensor:
        """ESM-2's LM head on hidden rows: the decoder tied to the token embeddings, its bias added after."""
        x = F.gelu(self._linear(x, lm["dense_w"], lm["dense_b"]))
        x = F.layer_norm(x, (self.hidden_size,), lm["ln_w"], lm["ln_b"], self.lm_eps)
        decoder = lm["decoder"] if "decoder" in lm else self.tok_embed
        return self._linear(x, decoder) + lm["bias"]


def _apc(x: torch.Tensor) -> torch.Tensor:
    """Average product correction, per map (fair-esm's ``apc``)."""
    a1 = x.sum(-1, keepdim=True)
    a2 = x.sum(-2, keepdim=True)
    return x - a1 * a2 / x.sum((-1, -2), keepdim=True)


def rotary_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The rotary inverse frequencies, float32 on the CPU, as transformers' and fair-esm's formula."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def check_layers(layers: Sequence[int], num_layers: int) -> None:
    if not layers or len(set(layers)) != len(layers) or not all(0 <= i <= num_layers for i in layers):
        raise ValueError(f"layers must be distinct indices in 0..{num_layers}, got {list(layers)}; this is a bug")


_VARLEN: list = []


def _varlen() -> Callable[..., Any] | None:
    """torch's varlen_attn, or None where this torch has none or one without ``scale`` (looked up once).

    ``scale=`` came with torch 2.11; torch 2.10 has the function without it. The queries are already scaled
    (folded into the QKV weight), so attention must run with scale 1: without the keyword, SDPA it is.
    """
    if not _VARLEN:
        found: Callable[..., Any] | None
        try:
            from torch.nn.attention.varlen import varlen_attn as found
        except ImportError:
            found = None
        if found is not None and "scale" not in inspect.signature(found).parameters:
            log.info("this torch's varlen_attn takes no scale (torch < 2.11): attention runs through SDPA")
            found = None
        _VARLEN.append(found)
    return _VARLEN[0]
