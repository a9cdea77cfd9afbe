"""Replicas: one copy of the model on one device, with its embed_batch and lm_log_probs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch

from esm2cli.config import BatchConfig, EmbedConfig
from esm2cli.errors import ConfigError
from esm2cli.io.schema import Embeddings
from esm2cli.model.forward import PackedEsm2
from esm2cli.model.graphs import GraphRunner
from esm2cli.model.load import LoadedModel
from esm2cli.model.packed import PackedBatch
from esm2cli.runtime.batching import SMALLEST_TOKEN_BUCKET, token_buckets
from esm2cli.runtime.devices import Device

log = logging.getLogger(__name__)

_CPU_THREADS = torch.get_num_threads()  # torch's default (the cores), before any replica changes it


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

    The forward is esm2cli's own packed one (esm2cli.model.forward): no pad token is computed. On a CUDA
    device in bf16/fp16, embeddings replay CUDA graphs captured per token bucket by ``warm_up``
    (esm2cli.model.graphs); contacts and scores run eagerly.

    Attributes:
        oom_splits: How many times a batch was split in two after a CUDA out-of-memory error.
        cpu_threads: Intra-op threads this replica's worker uses (CPU replicas only; None: torch's default).
        graphs: The CUDA-graph runner (None where graphs do not apply).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: Device,
        embed: EmbedConfig,
        forward: PackedEsm2,
        cpu_threads: int | None = None,
        batch: BatchConfig | None = None,
        *,
        smallest_bucket: int = SMALLEST_TOKEN_BUCKET,
    ):
        self.device = device
        self.cpu_threads = cpu_threads
        self.oom_splits = 0
        self._threads_set = False
        self.loaded = loaded
        self.forward = forward
        self.layers = resolve_layers(embed.layers, loaded.num_layers)
        self.pooling = embed.pooling
        self.per_token = embed.per_token
        self.contacts = embed.contacts
        if self.contacts and not forward.has_contact_head:
            raise RuntimeError("contacts asked of a model loaded without its contact head; this is a bug")
        self.graphs = self._graph_runner(embed, batch, smallest_bucket) if device.is_cuda else None

    def _graph_runner(self, embed: EmbedConfig, batch: BatchConfig | None, smallest: int) -> GraphRunner | None:
        """Graphs for the embeddings of this replica's batches (varlen attention on CUDA, no contacts).

        One a token bucket from ``smallest`` to the token budget, for batches of up to the batch size.
        """
        if batch is None or batch.max_tokens is None or self.contacts or not self.forward.uses_varlen():
            return None
        if embed.per_token:
            modes: tuple[bool, ...] = (True,)
        elif embed.long_sequences == "window":  # window batches bring per-token rows back to be stitched
            modes = (False, True)
        else:
            modes = (False,)
        return GraphRunner(
            self.forward, self.layers, self.pooling, buckets=token_buckets(batch.max_tokens, smallest),
            max_seqs=batch.batch_size, per_token_modes=modes,
        )  # fmt: skip

    def warm_up(self) -> None:
        """Captures this replica's CUDA graphs (once; nothing to do elsewhere)."""
        if self.graphs is not None and not self.graphs.warmed:
            self.graphs.warmup()

    def pack(self, seqs: Sequence[str], masked: Sequence[int | None] | None = None) -> PackedBatch:
        """A batch of validated residue strings, packed (``masked``: one residue per sequence replaced by <mask>)."""
        loaded = self.loaded
        return PackedBatch.from_sequences(
            seqs, loaded.token_lut, cls_id=loaded.cls_id, eos_id=loaded.eos_id, mask_id=loaded.mask_id,
            token_dropout=self.forward.token_dropout, masked=masked,
        )  # fmt: skip

    def embed_batch(self, seqs: Sequence[str], per_token: bool | None = None) -> Embeddings:
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
        return self._split_on_oom(lambda part: self._forward(part, per_token), seqs, Embeddings.concat)

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
        if not self.forward.has_lm_head:
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

    def close(self) -> None:
        """Called by the engine from the owner's thread once the workers have stopped."""
        # torch.set_num_threads in a worker also sets the process-wide count that every thread started later
        # inherits: a notebook's own torch work after an Embedder would run on one core.
        if self._threads_set:
            torch.set_num_threads(_CPU_THREADS)
            self._threads_set = False

    def _forward(self, seqs: Sequence[str], per_token: bool) -> Embeddings:
        batch = self.pack(seqs)
        if self.graphs is not None:
            out = self.graphs.embed(batch, per_token)
        else:
            out = self.forward.embed(batch, self.layers, self.pooling, per_token, self.contacts)
        return Embeddings(out.pooled, out.per_token, out.contacts)

    def _lm_forward(self, items: Sequence[tuple[str, int | None, Sequence[int]]]) -> list[np.ndarray]:
        batch = self.pack([seq for seq, _, _ in items], masked=[masked for _, masked, _ in items])
        rows = np.concatenate([batch.rows(i, read) for i, (_, _, read) in enumerate(items)])
        # Only the positions read go through the head: one per masked copy, not one per token.
        log_probs = self.forward.lm_log_probs(batch, rows).cpu().numpy()
        return np.split(log_probs, np.cumsum([len(read) for _, _, read in items])[:-1])


def build_replicas(
    loaded: LoadedModel,
    devices: Sequence[Device],
    embed: EmbedConfig,
    batch: BatchConfig | None = None,
    *,
    smallest_bucket: int = SMALLEST_TOKEN_BUCKET,
) -> list[Replica]:
    """Places one replica on each device, copying the weights loaded once.

    Replicas on the CPU (the CPU itself or simulated devices) share one set of weights:
    inference only reads them, and N copies would cost N times the memory for nothing.

    Args:
        loaded: The model, loaded once on the CPU.
        devices: One replica each.
        embed: Layers, pooling, per-token output and contacts.
        batch: The batch settings (the token budget and the batch size size the CUDA graphs' buckets).
        smallest_bucket: The CUDA graphs' smallest token bucket (the server's short requests want small ones).

    Raises:
        ConfigError: A layer index is out of range.
    """
    if loaded.forward is None:
        raise RuntimeError("replicas of a model loaded without weights; this is a bug")
    replicas = []
    cpu_replicas = sum(not d.is_cuda for d in devices)
    threads = max(1, _CPU_THREADS // cpu_replicas) if cpu_replicas else None
    for device in devices:
        if device.is_cuda:
            forward = copy.deepcopy(loaded.forward).to(device.torch_device)
            replicas.append(Replica(loaded, device, embed, forward, batch=batch, smallest_bucket=smallest_bucket))
        else:
            replicas.append(Replica(loaded, device, embed, loaded.forward, cpu_threads=threads))
    return replicas
