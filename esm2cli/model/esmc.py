"""The project's own ESM C inference forward, on the packed batches and attention of the ESM-2 one.

ESM C (Cambrian) as transformers' ``EsmcModel`` / ``EsmcForMaskedLM`` define it: token embeddings (no token
dropout, no position embeddings), then per layer

    x = x + attn(LN1(x)) / s          s = sqrt(layers / 36), the residual scaling of every ESM C checkpoint
    x = x + swiglu(LN2(x)) / s

where attention has one fused QKV matmul without biases, a LayerNorm without bias on the queries and on the
keys over the full width (before the split into heads), rotary positions (0 is <cls>) and softmax scaled by
head_dim^-0.5; the feed-forward is SwiGLU (one fused gate/up matmul, silu(gate) * up, a down projection), no
biases. A final LayerNorm without bias ends the encoder. The LM head is dense, GELU (exact erf), LayerNorm, and
a decoder of its own (not tied to the embeddings), with biases.

Folded into the weights once, at load: head_dim^-0.5 into the query norm's scale, 1/s into the output and
down projections. Everything else (packing, flash varlen on CUDA and SDPA groups elsewhere, the rotary table,
pooling and per-token rows on the device, one copy back, CUDA graphs per token bucket) is the ESM-2 forward's
machinery (esm2cli.model.forward.PackedEsm2), which this class extends; so is batch invariance
(esm2cli.model.invariant): every matmul on fixed row tiles, attention at each protein's own width rung,
mean pooling in a fixed order, so that a protein's numbers are bitwise the same alone or in any batch.

Hidden-state indices are transformers' ``hidden_states``: 0 the token embeddings, k (1..n-1) the raw output of
layer k, n the output after the final LayerNorm (``last_hidden_state``).

Imports only torch, numpy and the standard library: transformers' ESM C layers never run here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from esm2cli.model.forward import PackedEsm2
from esm2cli.model.packed import DeviceBatch

EPS = 1e-5  # torch's LayerNorm default, which every ESM C LayerNorm uses


class _EsmcLayer(nn.Module):
    """One ESM C layer's weights: pre-LN attention (fused QKV, q/k norms), pre-LN SwiGLU (fused gate/up)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.ln1_w = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.ln1_b = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.qkv_w = nn.Parameter(torch.empty(3 * hidden, hidden), requires_grad=False)
        self.qk_norm_w = nn.Parameter(torch.empty(2, hidden), requires_grad=False)  # q (scaled), k
        self.out_w = nn.Parameter(torch.empty(hidden, hidden), requires_grad=False)  # divided by s
        self.ln2_w = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.ln2_b = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.gate_up_w = nn.Parameter(torch.empty(2 * ffn, hidden), requires_grad=False)
        self.down_w = nn.Parameter(torch.empty(hidden, ffn), requires_grad=False)  # divided by s


def _param(tensor: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(tensor.detach().to(dtype).contiguous(), requires_grad=False)


class PackedEsmc(PackedEsm2):
    """ESM C inference on packed batches; built from a checkpoint's tensors by ``from_state_dict``.

    The interface is PackedEsm2's (embed, reduce_on_device, lm_log_probs, prepare, uses_varlen), so that
    replicas, CUDA graphs, scoring and serving run either family. There is no contact head.

    Attributes:
        ffn_size: The SwiGLU hidden size.
        residual_scale: s = sqrt(layers / 36), already folded into the output and down projections.
    """

    family = "esmc"

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int,
        max_positions: int,
        mask_id: int,
        dtype: torch.dtype = torch.float32,
    ):
        # The ESM-2 class sets up everything the shared machinery reads; its layers are replaced here.
        super().__init__(
            vocab_size=vocab_size, hidden_size=hidden_size, num_layers=0, num_heads=num_heads, ffn_size=ffn_size,
            max_positions=max_positions, eps=EPS, token_dropout=False, mask_id=mask_id, dtype=dtype,
        )  # fmt: skip
        self.num_layers, self.ffn_size = num_layers, ffn_size
        self.residual_scale = math.sqrt(num_layers / 36)
        with torch.device("meta"):
            self.layers = nn.ModuleList([_EsmcLayer(hidden_size, ffn_size) for _ in range(num_layers)])
        self.register_parameter("final_ln_b", None)  # ESM C's final LayerNorm has no bias

    @classmethod
    def from_state_dict(
        cls,
        weights: Mapping[str, torch.Tensor],
        *,
        num_layers: int,
        num_heads: int,
        max_positions: int,
        mask_id: int,
        rope_theta: float = 10000.0,
        dtype: torch.dtype = torch.float32,
        lm_head: bool = False,
    ) -> PackedEsmc:
        """Builds the model from transformers' ESM C tensors (``EsmcModel`` names, without the ``esmc.`` prefix).

        The keys are checked by the caller (esm2cli.model.esmc_load); here each is read once, fused, folded and
        converted to ``dtype``, on the CPU.

        Args:
            weights: Tensor by name: ``embed_tokens.weight``, ``layers.N.self_attn.q_proj.weight``, ...,
                ``norm.weight``, and with ``lm_head`` the ``lm_head.*`` tensors.
            num_layers, num_heads, max_positions, mask_id, rope_theta: From the config.
            dtype: The model's dtype.
            lm_head: Also copy the masked-LM head.

        Returns:
            The packed model, in eval mode, without gradients.
        """
        embed = weights["embed_tokens.weight"]
        vocab, hidden = embed.shape
        ffn = weights["layers.0.mlp.gate_proj.weight"].shape[0]
        model = cls(
            vocab_size=vocab, hidden_size=hidden, num_layers=num_layers, num_heads=num_heads, ffn_size=ffn,
            max_positions=max_positions, mask_id=mask_id, dtype=dtype,
        ).to_empty(device="cpu")  # fmt: skip
        model.tok_embed = _param(embed, dtype)
        scale = model.head_dim**-0.5  # the softmax scale, folded into the query norm (rotary is linear)
        for i, layer in enumerate(model.layers):
            w = _LayerWeights(weights, f"layers.{i}.")
            layer.ln1_w = _param(w["input_layernorm.weight"], dtype)
            layer.ln1_b = _param(w["input_layernorm.bias"], dtype)
            qkv = [w[f"self_attn.{p}_proj.weight"].float() for p in "qkv"]
            layer.qkv_w = _param(torch.cat(qkv), dtype)
            norms = torch.stack([w["self_attn.q_norm.weight"].float() * scale, w["self_attn.k_norm.weight"].float()])
            layer.qk_norm_w = _param(norms, dtype)
            layer.out_w = _param(w["self_attn.o_proj.weight"].float() / model.residual_scale, dtype)
            layer.ln2_w = _param(w["post_attention_layernorm.weight"], dtype)
            layer.ln2_b = _param(w["post_attention_layernorm.bias"], dtype)
            gate_up = torch.cat([w["mlp.gate_proj.weight"].float(), w["mlp.up_proj.weight"].float()])
            layer.gate_up_w = _param(gate_up, dtype)
            layer.down_w = _param(w["mlp.down_proj.weight"].float() / model.residual_scale, dtype)
        model.final_ln_w = _param(weights["norm.weight"], dtype)
        half = torch.arange(0, model.head_dim, 2, dtype=torch.float32) / model.head_dim
        model.inv_freq = 1.0 / (rope_theta**half)  # as transformers' default rotary parameters
        model._rotary_table(model.max_positions)
        if lm_head:
            names = {"dense_w": "dense.weight", "dense_b": "dense.bias", "ln_w": "layer_norm.weight",
                     "ln_b": "layer_norm.bias", "decoder": "decoder.weight", "bias": "decoder.bias"}  # fmt: skip
            model.lm = nn.ParameterDict({k: _param(weights[f"lm_head.{v}"], dtype) for k, v in names.items()})
        return model.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------------------
    # The forward (the rest is PackedEsm2's)

    def blocks(self) -> list[_EsmcLayer]:  # type: ignore[override]
        """The layers, typed (an nn.ModuleList yields plain Modules)."""
        return [layer for layer in self.layers if isinstance(layer, _EsmcLayer)]

    def _layer(self, x, lw, db: DeviceBatch, cos, sin, *, contacts=None, index=0) -> torch.Tensor:
        if contacts is not None:
            raise RuntimeError("contacts asked of ESM C, which has no contact head; this is a bug")
        hidden = self.hidden_size
        h = F.layer_norm(x, (hidden,), lw.ln1_w, lw.ln1_b, self.eps)
        qkv = self._linear(h, lw.qkv_w)
        # Queries and keys normalised over the full width at once, each with its own scale; then rotated (float32
        # as transformers' rotary where attention is padded SDPA, see PackedEsm2._rotate) and joined to v once.
        qk = F.layer_norm(qkv[:, : 2 * hidden].view(-1, 2, hidden), (hidden,), None, None, self.eps)
        qk = qk.mul_(lw.qk_norm_w).view(-1, 2, self.num_heads, self.head_dim)
        v = qkv[:, 2 * hidden :].view(-1, 1, self.num_heads, self.head_dim)
        qk = qk.float()
        rotated = torch.roll(qk, self.head_dim // 2, dims=-1).mul_(sin).add_(qk * cos)
        # flash varlen takes the model's dtype; padded SDPA stays in float32 (faster and more exact on the CPU)
        joined = [rotated.to(v.dtype), v] if self.uses_varlen() else [rotated, v.float()]
        a = self._attend(torch.cat(joined, dim=1), db)
        x = self._linear(a, lw.out_w).add_(x)
        h = F.layer_norm(x, (hidden,), lw.ln2_w, lw.ln2_b, self.eps)
        gate, up = self._linear(h, lw.gate_up_w).chunk(2, dim=-1)
        return self._linear(F.silu(gate) * up, lw.down_w).add_(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """ESM C's final LayerNorm (``norm``, no bias)."""
        return F.layer_norm(x, (self.hidden_size,), self.final_ln_w, None, self.eps)

    def _lm_logits(self, x: torch.Tensor, lm: nn.ParameterDict) -> torch.Tensor:
        """ESM C's LM head on hidden rows (64-token vocabulary): its own decoder, the bias inside the matmul."""
        x = F.gelu(self._linear(x, lm["dense_w"], lm["dense_b"]))
        x = F.layer_norm(x, (self.hidden_size,), lm["ln_w"], lm["ln_b"], EPS)
        return self._linear(x, lm["decoder"], lm["bias"])


class _LayerWeights:
    """One layer's tensors by their name inside the layer."""

    def __init__(self, weights: Mapping[str, torch.Tensor], prefix: str):
        self._weights, self._prefix = weights, prefix

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._weights[self._prefix + name]
