"""Replicas: one copy of the model on one device, with its embed_batch and lm_log_probs."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import EsmModel

from esm2cli.config import EmbedConfig
from esm2cli.errors import ConfigError
from esm2cli.model.contacts import ContactCollector
from esm2cli.model.load import LoadedModel, log, token_ids
from esm2cli.runtime.batching import padded_width
from esm2cli.runtime.devices import Device

_CPU_THREADS = torch.get_num_threads()  # torch's default (the cores), before any replica changes it


@dataclass
class BatchEmbeddings:
    """What one batch gives back, always on the CPU in float32.

    Attributes:
        pooled: Layer -> array of shape (batch, hidden).
        per_token: Layer -> one (residues, hidden) array per sequence; empty unless asked.
        contacts: One (residues, residues) array of contact probabilities per sequence; empty unless asked.
    """

    pooled: dict[int, np.ndarray]
    per_token: dict[int, list[np.ndarray]]
    contacts: list[np.ndarray] = field(default_factory=list)

    @staticmethod
    def concat(parts: Sequence[BatchEmbeddings]) -> BatchEmbeddings:
        """Joins the results of consecutive sub-batches, in order."""
        pooled = {layer: np.concatenate([p.pooled[layer] for p in parts]) for layer in parts[0].pooled}
        per_token = {layer: [a for p in parts for a in p.per_token[layer]] for layer in parts[0].per_token}
        return BatchEmbeddings(pooled, per_token, [a for p in parts for a in p.contacts])


def resolve_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Maps layer indices to 0..num_layers (negative counts from the end), keeping order, once each.

    Raises:
        ConfigError: A layer is out of range.
    """
    out: list[int] = []
    for layer in layers:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ConfigError(
                f"layer {layer} is out of range for a model with {num_layers} layers "
                f"(use 0..{num_layers}, or -{num_layers + 1}..-1 from the end)"
            )
        norm = layer % (num_layers + 1)
        if norm not in out:
            out.append(norm)
    return tuple(out)


class Replica:
    """One copy of the model on one device: embed_batch, and lm_log_probs when the LM head is loaded.

    Attributes:
        oom_splits: How many times a batch was split in two after a CUDA out-of-memory error.
        cpu_threads: Intra-op threads this replica's worker uses (CPU replicas only; None: torch's default).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: Device,
        embed: EmbedConfig,
        model: EsmModel,
        cpu_threads: int | None = None,
        lm_head: nn.Module | None = None,
    ):
        self.device = device
        self.cpu_threads = cpu_threads
        self.oom_splits = 0
        self._threads_set = False
        self.loaded = loaded
        self.model = model
        self.lm_head = lm_head
        self.layers = resolve_layers(embed.layers, loaded.num_layers)
        self.pooling = embed.pooling
        self.per_token = embed.per_token
        self.contacts = embed.contacts
        if self.contacts and model.contact_head is None:
            raise RuntimeError("contacts asked of a model loaded without its contact head; this is a bug")
        self._torch_device = torch.device(device.torch_device)
        # The last layer is last_hidden_state (after the final LayerNorm, as in fair-esm);
        # any other layer needs every hidden state.
        self._need_hidden_states = any(layer != loaded.num_layers for layer in self.layers)

    def tokenize(self, seqs: Sequence[str]) -> torch.Tensor:
        """Token ids of a batch, padded to its width bucket: <cls> residues <eos> <pad>... (pre-validated)."""
        return torch.from_numpy(token_ids(self.loaded, seqs, padded_width(max(len(s) for s in seqs))))

    def embed_batch(self, seqs: Sequence[str], per_token: bool | None = None) -> BatchEmbeddings:
        """Embeds a batch of validated, already truncated sequences.

        A CUDA out-of-memory error splits the batch in two and retries each half (recursively),
        so a batch too large for the device costs time, not the run.

        Args:
            seqs: Upper-case residue strings.
            per_token: Also return per-residue vectors (None: as the replica's EmbedConfig says);
                windows of long proteins need them to be stitched.

        Returns:
            Pooled (and optionally per-residue) float32 CPU arrays, one row per sequence, in order.

        Raises:
            torch.cuda.OutOfMemoryError: A single sequence does not fit on the device.
        """
        self._set_threads()
        per_token = self.per_token if per_token is None else per_token
        return self._split_on_oom(lambda part: self._forward(part, per_token), seqs, BatchEmbeddings.concat)

    def lm_log_probs(self, items: Sequence[tuple[str, int | None, Sequence[int]]]) -> list[np.ndarray]:
        """The masked-LM head's log-probabilities for a batch of (optionally masked) sequences.

        Args:
            items: (sequence, masked, read) triples: the residue at 0-based position ``masked`` is replaced
                by <mask> (None: nothing is masked), and the positions in ``read`` (0-based) are returned.
                Sequences are validated and fit the model.

        Returns:
            Per item, a float32 array of log-softmax values over the whole vocabulary (columns are token
            ids), one row per position read, in the order given.

        Raises:
            torch.cuda.OutOfMemoryError: A single sequence does not fit on the device.
        """
        if self.lm_head is None:
            raise RuntimeError("lm_log_probs on a replica without its LM head; this is a bug")
        self._set_threads()
        return self._split_on_oom(self._lm_forward, items, lambda parts: [a for p in parts for a in p])

    def _split_on_oom(self, forward, items, join):
        """Runs forward(items); a CUDA out-of-memory error splits the batch in two and retries each half."""
        try:
            return forward(items)
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise
        # Outside the except block, so that the failed attempt's tensors can be freed first.
        self.oom_splits += 1
        if self.device.is_cuda:
            torch.cuda.empty_cache()
        half = len(items) // 2
        log.warning("out of memory on %s with %d sequences; splitting the batch", self.device.name, len(items))
        return join([self._split_on_oom(forward, items[:half], join), self._split_on_oom(forward, items[half:], join)])

    def _set_threads(self) -> None:
        # Set from the worker thread, whose OpenMP team it sizes (MKL's count is process-wide, but every
        # CPU replica asks for the same share), so that replicas sharing the cores do not oversubscribe them.
        if self.cpu_threads and not self._threads_set:
            torch.set_num_threads(self.cpu_threads)
            self._threads_set = True

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.is_cuda:
            tensor = tensor.pin_memory()
        return tensor.to(self._torch_device, non_blocking=True)

    def _forward(self, seqs: Sequence[str], per_token: bool) -> BatchEmbeddings:
        ids = self._to_device(self.tokenize(seqs))
        lengths = self._to_device(torch.tensor([len(s) for s in seqs]))
        collector = ContactCollector(self.model.contact_head, ids, self.loaded) if self.contacts else None
        with torch.inference_mode(), collector or contextlib.nullcontext():
            out = self.model(
                input_ids=ids,
                attention_mask=(ids != self.loaded.pad_id).long(),
                output_hidden_states=self._need_hidden_states,
            )
            states = {
                layer: out.hidden_states[layer] if self._need_hidden_states else out.last_hidden_state
                for layer in self.layers
            }
            result = self._pool(states, lengths, per_token)
            if collector is not None:
                result.contacts = collector.contacts([len(s) for s in seqs])
            return result

    def _lm_forward(self, items: Sequence[tuple[str, int | None, Sequence[int]]]) -> list[np.ndarray]:
        ids = self.tokenize([seq for seq, _, _ in items])
        rows, cols, counts = [], [], []
        for row, (_, masked, read) in enumerate(items):
            if masked is not None:
                ids[row, masked + 1] = self.loaded.mask_id
            cols.append(np.asarray(read, dtype=np.int64) + 1)  # position 0 is <cls>
            rows.append(np.full(len(read), row))
            counts.append(len(read))
        ids = self._to_device(ids)
        rows_t = self._to_device(torch.from_numpy(np.concatenate(rows)))
        cols_t = self._to_device(torch.from_numpy(np.concatenate(cols)))
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=(ids != self.loaded.pad_id).long()).last_hidden_state
            # Only the positions read go through the head: one per masked copy, not one per token.
            logits = self.lm_head(hidden[rows_t, cols_t]).float()
            log_probs = torch.log_softmax(logits, dim=-1).cpu().numpy()
        return np.split(log_probs, np.cumsum(counts)[:-1])

    def _pool(self, states: dict[int, torch.Tensor], lengths: torch.Tensor, want_tokens: bool) -> BatchEmbeddings:
        """Pools each layer over residue positions 1..L (mean) or takes position 0 (bos)."""
        width = next(iter(states.values())).shape[1]
        pos = torch.arange(width, device=lengths.device)
        residues = (pos[None, :] >= 1) & (pos[None, :] <= lengths[:, None])
        pooled: dict[int, np.ndarray] = {}
        per_token: dict[int, list[np.ndarray]] = {}
        for layer, hidden in states.items():
            h = hidden.float()
            if self.pooling == "mean":
                vec = (h * residues[..., None]).sum(dim=1) / lengths[:, None]
            else:
                vec = h[:, 0]
            pooled[layer] = vec.cpu().numpy().copy()
            if want_tokens:
                host = h.cpu()
                per_token[layer] = [host[i, 1 : n + 1].numpy().copy() for i, n in enumerate(lengths.tolist())]
        return BatchEmbeddings(pooled, per_token)


def build_replicas(loaded: LoadedModel, devices: Sequence[Device], embed: EmbedConfig) -> list[Replica]:
    """Places one replica on each device, copying the weights loaded once.

    Replicas on the CPU (the CPU itself or simulated devices) share one set of weights:
    inference only reads them, and N copies would cost N times the memory for nothing.

    Raises:
        ConfigError: A layer index is out of range.
    """
    replicas = []
    cpu_replicas = sum(not d.is_cuda for d in devices)
    threads = max(1, _CPU_THREADS // cpu_replicas) if cpu_replicas else None
    for device in devices:
        if device.is_cuda:
            # One deepcopy of both keeps the LM head's decoder tied to the copy's token embeddings.
            model, head = copy.deepcopy((loaded.model, loaded.lm_head))
            model = model.to(device.torch_device)
            head = head.to(device.torch_device) if head is not None else None
            replicas.append(Replica(loaded, device, embed, model, lm_head=head))
        else:
            replicas.append(Replica(loaded, device, embed, loaded.model, cpu_threads=threads, lm_head=loaded.lm_head))
    return replicas
