"""CUDA graphs of the packed forward, one per token bucket: a batch replays its bucket's graph (near-zero host
cost per forward); a capture failure falls back to eager with one warning."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from esm2cli.model.forward import PackedEsm2, check_layers
from esm2cli.model.packed import (
    DeviceBatch,
    EmbedResult,
    GroupPlan,
    PackedBatch,
    host_to_device,
    plan_groups,
    split_host,
    unpack_groups,
)

log = logging.getLogger(__name__)


@dataclass
class _Static:
    """One bucket's static inputs and outputs (the tensors a captured graph reads and writes)."""

    tokens: int  # Tb: packed tokens, the batch's padded with dummy segments
    slots: int  # proteins at most (real ones, then dummy segments, then empty ones)
    ints: torch.Tensor  # int64 inputs, one buffer (one copy per batch)
    floats: torch.Tensor  # float32 inputs, one buffer
    host_ints: torch.Tensor  # pinned host mirrors
    host_floats: torch.Tensor
    groups: list[GroupPlan] = field(default_factory=list)  # SDPA path only (no graph)
    graph: object = None
    out: torch.Tensor | None = None


class GraphRunner:
    """The packed embed forward replayed from CUDA graphs, one per token bucket (near-zero host cost).

    A batch runs in the smallest bucket holding its tokens: its packed tokens are followed by dummy
    segments up to the bucket's size (each at most ``max_positions`` long, attending only to themselves),
    and its ``cu_seqlens`` by empty segments up to a fixed count. Pooling, the per-token rows and their
    compaction into one contiguous block run inside the graph; the host copies that block once.

    Graphs are captured by ``warmup`` (CUDA with varlen attention, i.e. bf16/fp16). A capture failure logs one
    warning and every later batch runs eagerly. A batch no bucket holds runs eagerly too. Where graphs do not
    apply (``capture=False``: the CPU, fp32) the same bucketed inputs run eagerly, which tests the layout.

    Args:
        model: The packed model.
        layers: Hidden-state indices returned (0..num_layers).
        pooling: "mean" or "bos".
        buckets: Token counts graphs are captured for (esm2cli.runtime.batching.token_buckets).
        max_seqs: Proteins per batch at most (the batch size cap).
        per_token_modes: With and/or without per-token rows (windows need them).
        capture: Capture CUDA graphs (None: where the model runs varlen attention on CUDA).
    """

    def __init__(
        self,
        model: PackedEsm2,
        layers: Sequence[int],
        pooling: str,
        *,
        buckets: Sequence[int],
        max_seqs: int,
        per_token_modes: Sequence[bool] = (False,),
        capture: bool | None = None,
    ):
        check_layers(layers, model.num_layers)
        self.model, self.layers, self.pooling = model, tuple(layers), pooling
        self.buckets = sorted(set(buckets))
        self.max_seqs = max_seqs
        self.per_token_modes = tuple(per_token_modes)
        self.capture = model.uses_varlen() if capture is None else capture
        self.failed = False
        self.warmed = False  # warmup ran (whether or not capture succeeded)
        self.launched_at = 0.0  # perf_counter() when the last embed had launched its work (before the copy back)
        self._static: dict[tuple[int, bool], _Static] = {}
        self._pool = None
        self.graph_batches = 0  # batches replayed from a graph (or from bucketed inputs without one)
        self.eager_batches = 0

    def _cap(self, tokens: int) -> int:
        return min(tokens, self.model.max_positions)

    def _slots(self, tokens: int) -> int:
        return self.max_seqs + -(-tokens // self._cap(tokens)) + 1

    def _rows(self, tokens: int, per_token: bool) -> int:
        return len(self.layers) * (self.max_seqs + (tokens if per_token else 0))

    def _layout(self, tokens: int, per_token: bool) -> tuple[list[int], list[int]]:
        """Sizes of the int64 and float32 input pieces of a bucket."""
        ints = [tokens, tokens, self._slots(tokens) + 1, tokens, self.max_seqs, tokens, self._rows(tokens, per_token)]
        return ints, [tokens, self.max_seqs + 1]

    def _allocate(self, tokens: int, per_token: bool) -> _Static:
        device = self.model.device
        ints, floats = self._layout(tokens, per_token)
        pin = device.type == "cuda"
        return _Static(
            tokens=tokens,
            slots=self._slots(tokens),
            ints=torch.zeros(sum(ints), dtype=torch.int64, device=device),
            floats=torch.zeros(sum(floats), dtype=torch.float32, device=device),
            host_ints=torch.zeros(sum(ints), dtype=torch.int64, pin_memory=pin),
            host_floats=torch.zeros(sum(floats), dtype=torch.float32, pin_memory=pin),
        )

    def _forward(self, st: _Static, per_token: bool) -> torch.Tensor:
        """The bucket's forward on its static buffers: the compacted (rows, hidden) float32 output."""
        ints, floats = self._layout(st.tokens, per_token)
        tokens, positions, cu, pool_index, bos_rows, residue_rows, keep = torch.split(st.ints, ints)
        scale, inv_lengths = torch.split(st.floats, floats)
        db = DeviceBatch(
            host=None,
            tokens=tokens,
            positions=positions,
            scale=scale,
            cu_seqlens=cu.to(torch.int32),
            pool_index=pool_index,
            inv_lengths=inv_lengths,
            bos_rows=bos_rows,
            residue_rows=residue_rows,
            num_seqs=self.max_seqs,
            max_len=self._cap(st.tokens),
            groups=st.groups,
        )
        flat = self.model.reduce_on_device(db, self.layers, self.pooling, per_token)
        return flat.index_select(0, keep)

    def _fill(self, st: _Static, batch: PackedBatch, per_token: bool, copy: bool = True) -> int:
        """Writes a batch into the bucket's host buffers (and, ``copy``, to the device); returns the real rows."""
        t, b, tb, ms = batch.num_tokens, batch.num_seqs, st.tokens, self.max_seqs
        ints_sizes, floats_sizes = self._layout(tb, per_token)
        host_i = st.host_ints.numpy()
        tokens, positions, cu, pool_index, bos_rows, residue_rows, keep = np.split(host_i, np.cumsum(ints_sizes)[:-1])
        scale, inv_lengths = np.split(st.host_floats.numpy(), np.cumsum(floats_sizes)[:-1])
        tokens[:t], tokens[t:] = batch.tokens, 0
        positions[:t], positions[t:] = batch.positions, 0
        scale[:t], scale[t:] = batch.scale, 1.0
        # Dummy segments of at most cap tokens fill the bucket, then empty segments fill the slots.
        cap = self._cap(tb)
        ends = np.arange(t + cap, tb + cap, cap).clip(max=tb) if t < tb else np.zeros(0, dtype=np.int64)
        cu[: b + 1] = batch.cu_seqlens
        cu[b + 1 : b + 1 + len(ends)] = ends
        cu[b + 1 + len(ends) :] = tb
        rows = batch.residue_rows()
        pool_index[:] = ms
        pool_index[rows] = np.repeat(np.arange(b), batch.lengths)
        bos_rows[:b], bos_rows[b:] = batch.cu_seqlens[:-1], 0
        residue_rows[: len(rows)], residue_rows[len(rows) :] = rows, 0
        inv_lengths[:] = 0.0
        inv_lengths[:b] = 1.0 / np.maximum(batch.lengths, 1)
        per_layer = ms + (tb if per_token else 0)
        take = [np.arange(b)] + ([ms + np.arange(len(rows))] if per_token else [])
        real = np.concatenate([np.concatenate(take) + i * per_layer for i in range(len(self.layers))])
        keep[: len(real)], keep[len(real) :] = real, 0
        if not self.capture:  # the SDPA path plans its groups from this batch's segments
            sizes = np.diff(cu)
            plan: list[np.ndarray] = []
            shapes = plan_groups(sizes, cu[:-1], plan)
            flat = host_to_device(np.concatenate(plan), self.model.device)
            st.groups = unpack_groups(iter(torch.split(flat, [len(a) for a in plan])), shapes)
        if copy:
            st.ints.copy_(st.host_ints, non_blocking=True)
            st.floats.copy_(st.host_floats, non_blocking=True)
        return len(real)

    def _capture(self, st: _Static, per_token: bool) -> None:
        # A valid batch in the buffers first, so that the warm-up runs compute defined values.
        probe = PackedBatch.from_token_ids([np.array([0, 4, 2])], mask_id=self.model.mask_id)
        self._fill(st, probe, per_token)
        device = self.model.device
        with torch.cuda.device(device):  # graphs capture on the current device's streams
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # cuBLAS handles, flash-attention setup: outside the graph
                    self._forward(st, per_token)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # One memory pool for every bucket: batches run one at a time, each output copied out at once.
            with torch.cuda.graph(graph, pool=self._pool):
                st.out = self._forward(st, per_token)
        st.graph = graph

    @torch.inference_mode()
    def warmup(self) -> None:
        """Allocates every bucket's buffers and captures its graph (largest first, so the pool fits all)."""
        start = time.perf_counter()
        self.warmed = True
        try:
            for tokens in sorted(self.buckets, reverse=True):
                for per_token in self.per_token_modes:
                    st = self._allocate(tokens, per_token)
                    if self.capture:
                        self._capture(st, per_token)
                    self._static[(tokens, per_token)] = st
        except Exception as exc:  # a capture that fails costs speed, never the run
            self._give_up(exc)
            return
        if self.capture:
            log.info(
                "captured %d CUDA graphs (token buckets %s) in %.1f s",
                len(self._static), ", ".join(map(str, self.buckets)), time.perf_counter() - start,
            )  # fmt: skip

    def _give_up(self, exc: BaseException) -> None:
        self.failed = True
        self._static.clear()
        self._pool = None
        warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly", stacklevel=3)
        log.warning("CUDA graph capture failed (%s: %s); running eagerly", type(exc).__name__, exc)

    def bucket_for(self, batch: PackedBatch, per_token: bool) -> int | None:
        """The smallest bucket holding the batch, or None when it runs eagerly."""
        if self.failed or batch.num_seqs > self.max_seqs or batch.max_len > self.model.max_positions:
            return None  # (a protein longer than the config's positions runs eagerly, which grows the table)
        for tokens in self.buckets:
            if batch.num_tokens <= tokens and (tokens, per_token) in self._static:
                return tokens
        return None

    @torch.inference_mode()
    def embed(self, batch: PackedBatch, per_token: bool = False) -> EmbedResult:
        """Embeds a batch from its bucket's graph (or eagerly when none holds it); as PackedEsm2.embed."""
        tokens = self.bucket_for(batch, per_token)
        if tokens is None:
            self.eager_batches += 1
            result = self.model.embed(batch, self.layers, self.pooling, per_token)
            self.launched_at = self.model.launched_at
            return result
        st = self._static[(tokens, per_token)]
        n = self._fill(st, batch, per_token)
        if st.graph is not None:
            with torch.cuda.device(self.model.device):
                st.graph.replay()
            out = st.out
        else:
            out = self._forward(st, per_token)
        self.graph_batches += 1
        self.launched_at = time.perf_counter()  # the host's part ends here: benchmarks read it (host ms a forward)
        return split_host(out[:n].cpu().numpy(), batch, self.layers, per_token, [])
