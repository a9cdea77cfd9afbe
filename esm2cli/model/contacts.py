"""ESM-2's contact head, folded into the forward pass one layer at a time.

fair-esm (``return_contacts=True``) and transformers (``predict_contacts``) keep every layer's attention
maps and stack them: layers x heads x T x T floats per sequence, 2.7 GB for one 1,022-residue protein on
the 650M model. The head is linear in those maps after a per-map correction (symmetrise, then APC), so
each layer's maps can be corrected, weighted and summed into one T x T logit as soon as the layer has run,
and dropped. The result is the same function, with one layer's maps alive at a time.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn
from transformers import EsmModel

# The batch being collected on this thread. CPU replicas share one model (and so its hooks) across
# worker threads; each worker runs its forward pass on its own thread.
_active = threading.local()


def install_contact_hooks(model: EsmModel) -> None:
    """Hooks each layer's self-attention so that its attention maps reach the active ContactCollector.

    The hooks do nothing outside a ``with ContactCollector(...)`` block on the same thread.
    """
    for index, layer in enumerate(model.encoder.layer):
        layer.attention.self.register_forward_hook(_hook(index))


def _hook(index: int):
    def hook(module: nn.Module, args, output) -> None:
        collector = getattr(_active, "collector", None)
        if collector is not None:
            collector.add(index, output[1])

    return hook


def _apc(x: torch.Tensor) -> torch.Tensor:
    """Average product correction, per map (as fair-esm's ``apc``)."""
    a1 = x.sum(-1, keepdim=True)
    a2 = x.sum(-2, keepdim=True)
    return x - a1 * a2 / x.sum((-1, -2), keepdim=True)


class ContactCollector:
    """Sums each layer's contribution to the contact logits of one batch, then applies the sigmoid.

    Args:
        head: The model's contact head (``regression``: a linear map over layers x heads features).
        ids: The batch's token ids on the device: <cls> residues <eos> <pad>...
        tokens: Anything with ``pad_id`` and ``eos_id`` (a LoadedModel).
    """

    def __init__(self, head: nn.Module, ids: torch.Tensor, tokens):
        self.weight = head.regression.weight.float()[0]  # (layers * heads,), layer-major as fair-esm's view
        self.bias = head.regression.bias.float() if head.regression.bias is not None else None
        # As fair-esm: attention to and from <eos> and padding is zeroed, then <cls> and the last column dropped.
        keep = ((ids != tokens.pad_id) & (ids != tokens.eos_id)).float()
        self.keep = (keep[:, :, None] * keep[:, None, :])[:, None, 1:-1, 1:-1]
        self.logits: torch.Tensor | None = None

    def __enter__(self) -> ContactCollector:
        _active.collector = self
        return self

    def __exit__(self, *exc_info) -> None:
        _active.collector = None

    def add(self, layer: int, attentions: torch.Tensor | None) -> None:
        """Folds one layer's attention probabilities (batch, heads, T, T) into the logits."""
        if attentions is None:
            raise RuntimeError("the attention kernel returned no weights (not eager); this is a bug")
        heads = attentions.shape[1]
        maps = attentions[:, :, 1:-1, 1:-1].float() * self.keep
        maps = _apc(maps + maps.transpose(-1, -2))
        part = torch.einsum("bhij,h->bij", maps, self.weight[layer * heads : (layer + 1) * heads])
        self.logits = part if self.logits is None else self.logits + part

    def contacts(self, lengths: list[int]) -> list[np.ndarray]:
        """The contact probabilities of each sequence, (length, length) float32 arrays on the CPU."""
        if self.logits is None:
            raise RuntimeError("no attention maps were collected; this is a bug")
        logits = self.logits if self.bias is None else self.logits + self.bias
        probs = torch.sigmoid(logits).cpu().numpy()
        return [probs[i, :n, :n].copy() for i, n in enumerate(lengths)]
