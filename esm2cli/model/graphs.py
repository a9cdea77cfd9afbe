"""CUDA graphs of the packed forward, one per token bucket: a batch replays its bucket's graph (near-zero host
cost per forward); a capture failure falls back to eager with one warning, a graph that disagrees with the eager
forward leaves its bucket eager with one log line."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from esm2cli.io.schema import Embeddings
from esm2cli.model.forward import PackedEsm2, check_layers
from esm2cli.model.invariant import POOL_CHUNK
from esm2cli.model.packed import (
    BatchLayout,
    GroupPlan,
    Layout,
    PackedBatch,
    device_batch,
    host_to_device,
    plan_groups,
    pool_fields,
    split_host,
    unpack_groups,
)

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = logging.getLogger(__name__)


_CAPTURE_LOCK = threading.Lock()  # torch allows one capture at a time in a process, whatever the thread
_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream graphs on ``device`` are captured on, created on that device (once per device).

    ``torch.cuda.graph`` without ``stream=`` uses one stream of its class, created on whichever device was
    current the first time: every other card would capture on a stream of the wrong device.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _CAPTURE_STREAMS[index]


@dataclass
class _Static:
    """One bucket's static inputs (the tensors a captured graph reads) and its graph."""

    tokens: int  # Tb: packed tokens, the batch's padded with dummy segments
    slots: int  # proteins at most (real ones, then dummy segments, then empty ones)
    per_token: bool  # whether the output holds the residue rows
    layout: BatchLayout  # what is where in ints and floats
    ints: torch.Tensor  # int64 inputs, one buffer (one copy per batch)
    floats: torch.Tensor  # float32 inputs, one buffer
    host_ints: torch.Tensor  # pinned host mirrors
    host_floats: torch.Tensor
    groups: list[GroupPlan] = field(default_factory=list)  # SDPA path only (no graph)
    graph: torch.cuda.CUDAGraph | None = None


class GraphRunner:
    """The packed embed forward replayed from CUDA graphs, one per token bucket (near-zero host cost).

    A batch runs in the smallest bucket holding its tokens: its packed tokens are followed by dummy
    segments up to the bucket's size (each at most ``max_positions`` long, attending only to themselves),
    and its ``cu_seqlens`` by empty segments up to a fixed count. Pooling, the per-token rows and their
    compaction into one contiguous block run inside the graph, which writes that block into one output
    buffer shared by every bucket; the host copies it once.

    Graphs are captured by ``warmup`` (CUDA with varlen attention, i.e. bf16/fp16), one capture at a time in
    the process, each on its device's own capture stream; each graph is then replayed once on a probe batch
    and compared with the eager forward, and a bucket whose graph disagrees runs eagerly (one log line). A
    capture failure logs one warning and every later batch runs eagerly. A batch no bucket holds runs eagerly
    too. Where graphs do not apply (``capture=False``: the CPU, fp32) the same bucketed inputs run eagerly,
    which tests the layout.

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
        self.sdpa_groups = not model.uses_varlen()  # the SDPA path plans its groups from each batch's segments
        self.failed = False
        self.warmed = False  # warmup ran (whether or not capture succeeded)
        self.launched_at = 0.0  # perf_counter() when the last embed had launched its work (before the copy back)
        self._static: dict[tuple[int, bool], _Static] = {}
        self._pool: _POOL_HANDLE | None = None
        self._out: torch.Tensor | None = None  # every bucket's output rows, one buffer (one batch at a time)
        self.graph_batches = 0  # batches replayed from a graph (or from bucketed inputs without one)
        self.eager_batches = 0

    def _cap(self, tokens: int) -> int:
        return min(tokens, self.model.max_positions)

    def _slots(self, tokens: int) -> int:
        return self.max_seqs + -(-tokens // self._cap(tokens)) + 1

    def _rows(self, tokens: int, per_token: bool) -> int:
        return len(self.layers) * (self.max_seqs + (tokens if per_token else 0))

    def _pool_sizes(self, tokens: int) -> dict[str, int]:
        """Static chunk slots and width of mean pooling's fixed-order sums (invariant.pool_plan) for a bucket."""
        most = -(-max(self._cap(tokens) - 2, 1) // POOL_CHUNK)  # chunks of the longest protein a bucket holds
        return {"chunks": tokens // POOL_CHUNK + self.max_seqs, "width": 1 << (most - 1).bit_length()}

    def layout(self, tokens: int, per_token: bool) -> BatchLayout:
        """A bucket's input buffers: the batch's fields at the bucket's sizes, and ``keep`` (the output rows)."""
        extra = {"keep": self._rows(tokens, per_token)}
        if self.model.batch_invariant:
            sizes = self._pool_sizes(tokens)
            slots = sizes["chunks"] * POOL_CHUNK
            extra |= {"pool.rows": slots, "pool.valid": slots, "pool.chunks": self.max_seqs * sizes["width"]}
        return BatchLayout.sized(
            tokens=tokens, seqs=self.max_seqs, segments=self._slots(tokens), residues=tokens, extra=extra
        )

    def _allocate(self, tokens: int, per_token: bool) -> _Static:
        device = self.model.device
        layout = self.layout(tokens, per_token)
        pin = device.type == "cuda"
        return _Static(
            tokens=tokens,
            slots=self._slots(tokens),
            per_token=per_token,
            layout=layout,
            ints=torch.zeros(layout.ints.total, dtype=torch.int64, device=device),
            floats=torch.zeros(layout.floats.total, dtype=torch.float32, device=device),
            host_ints=torch.zeros(layout.ints.total, dtype=torch.int64, pin_memory=pin),
            host_floats=torch.zeros(layout.floats.total, dtype=torch.float32, pin_memory=pin),
        )

    def _forward(self, st: _Static, per_token: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        """The bucket's forward on its static buffers: the compacted (rows, hidden) float32 output (into ``out``)."""
        ints = st.layout.ints.split(st.ints)
        db = device_batch(
            None, ints, st.layout.floats.split(st.floats), num_seqs=self.max_seqs, max_len=self._cap(st.tokens),
            groups=st.groups,
        )  # fmt: skip
        flat = self.model.reduce_on_device(db, self.layers, self.pooling, per_token)
        if out is None:
            return flat.index_select(0, ints["keep"])
        return torch.index_select(flat, 0, ints["keep"], out=out)

    def _output(self, st: _Static, per_token: bool) -> torch.Tensor:
        """The shared output buffer's rows for this bucket."""
        if self._out is None:
            raise RuntimeError("a bucket used before warmup; this is a bug")
        return self._out[: self._rows(st.tokens, per_token)]

    def _fill(self, st: _Static, batch: PackedBatch, per_token: bool, copy: bool = True) -> int:
        """Writes a batch into the bucket's host buffers (and, ``copy``, to the device); returns the real rows."""
        if per_token != st.per_token:
            raise ValueError(f"per_token={per_token} in a bucket laid out for {st.per_token}; this is a bug")
        t, b, tb, ms = batch.num_tokens, batch.num_seqs, st.tokens, self.max_seqs
        ints = st.layout.ints.split(st.host_ints.numpy())
        floats = st.layout.floats.split(st.host_floats.numpy())
        tokens, positions, cu, scale = ints["tokens"], ints["positions"], ints["cu_seqlens"], floats["scale"]
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
        ints["pool_index"][:] = ms
        ints["pool_index"][rows] = np.repeat(np.arange(b), batch.lengths)
        ints["bos_rows"][:b], ints["bos_rows"][b:] = batch.cu_seqlens[:-1], 0
        ints["residue_rows"][: len(rows)], ints["residue_rows"][len(rows) :] = rows, 0
        floats["inv_lengths"][:] = 0.0
        floats["inv_lengths"][:b] = 1.0 / np.maximum(batch.lengths, 1)
        per_layer = ms + (tb if per_token else 0)
        take = [np.arange(b)] + ([ms + np.arange(len(rows))] if per_token else [])
        real = np.concatenate([np.concatenate(take) + i * per_layer for i in range(len(self.layers))])
        ints["keep"][: len(real)], ints["keep"][len(real) :] = real, 0
        if "pool.rows" in ints:
            static = self._pool_sizes(tb)
            sums = pool_fields(batch, **static)
            chunks = ints["pool.chunks"].reshape(ms, static["width"])
            chunks[:] = static["chunks"]  # every slot past the batch's proteins: the zero chunk
            chunks[:b] = sums["pool.chunks"].reshape(b, static["width"])
            ints["pool.rows"][:], ints["pool.valid"][:] = sums["pool.rows"], sums["pool.valid"]
        if self.sdpa_groups:
            fields, shapes = plan_groups(np.diff(cu), cu[:-1], invariant=self.model.batch_invariant)
            groups = Layout.of({name: len(a) for name, a in fields.items()})
            flat = host_to_device(groups.pack(fields, np.int64), self.model.device)
            st.groups = unpack_groups(groups.split(flat), shapes)
        if copy:
            st.ints.copy_(st.host_ints, non_blocking=True)
            st.floats.copy_(st.host_floats, non_blocking=True)
        return len(real)

    def _probe(self, proteins: int) -> PackedBatch:
        """A valid batch of short proteins (token ids of residues), so that warm-up runs compute defined values."""
        ids = [np.array([0, *range(4, 5 + i), 2]) for i in range(max(1, min(proteins, self.max_seqs)))]
        return PackedBatch.from_token_ids(ids, mask_id=self.model.mask_id)

    def _capture(self, st: _Static, per_token: bool) -> None:
        self._fill(st, self._probe(1), per_token)
        device = self.model.device
        with torch.cuda.device(device):  # graphs capture on the current device's streams
            stream = capture_stream(device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # cuBLAS handles, flash-attention setup: outside the graph
                    self._forward(st, per_token, out=self._output(st, per_token))
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # One memory pool for every bucket (batches run one at a time), and the one stream of this device that
            # every capture into that pool must use.
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                self._forward(st, per_token, out=self._output(st, per_token))
        st.graph = graph

    def _replay(self, st: _Static) -> None:
        if st.graph is None:
            raise RuntimeError("a replay without a graph; this is a bug")
        with torch.cuda.device(self.model.device):
            st.graph.replay()

    def _verify(self, st: _Static, per_token: bool) -> None:
        """Replays a fresh graph once on a probe batch against the eager forward; a bucket that disagrees runs eagerly.

        The output is filled with NaN first, so that a graph which captured nothing cannot pass.
        """
        n = self._fill(st, self._probe(3), per_token)
        out = self._output(st, per_token)
        out.fill_(float("nan"))
        self._replay(st)
        got = out[:n].clone()
        want = self._forward(st, per_token)[:n]
        if torch.allclose(got, want, rtol=1e-3, atol=1e-3):
            return
        worst = float((got - want).abs().nan_to_num(float("inf")).max())
        st.graph = None
        log.warning(
            "the CUDA graph of the %d-token bucket%s does not replay the eager forward on %s (largest difference "
            "%.3g); that bucket runs eagerly", st.tokens, " (per-token rows)" if per_token else "", self.model.device,
            worst,
        )  # fmt: skip

    @torch.inference_mode()
    def warmup(self) -> None:
        """Allocates every bucket's buffers and captures its graph (largest first, so the pool fits all)."""
        start = time.perf_counter()
        self.warmed = True
        rows = max(self._rows(tokens, mode) for tokens in self.buckets for mode in self.per_token_modes)
        self._out = torch.empty(rows, self.model.hidden_size, dtype=torch.float32, device=self.model.device)
        try:
            with _CAPTURE_LOCK if self.capture else contextlib.nullcontext():
                for tokens in sorted(self.buckets, reverse=True):
                    for per_token in self.per_token_modes:
                        st = self._allocate(tokens, per_token)
                        if self.capture:
                            self._capture(st, per_token)
                            self._verify(st, per_token)
                        self._static[(tokens, per_token)] = st
        except Exception as exc:  # a capture that fails costs speed, never the run
            self._give_up(exc)
            return
        if self.capture:
            with torch.cuda.device(self.model.device):  # what the checks against eager held, back to the card
                torch.cuda.empty_cache()
            kept = sum(st.graph is not None for st in self._static.values())
            log.info(
                "captured %d CUDA graphs of %d (token buckets %s) on %s in %.1f s", kept, len(self._static),
                ", ".join(map(str, self.buckets)), self.model.device, time.perf_counter() - start,
            )  # fmt: skip

    def _give_up(self, exc: BaseException) -> None:
        self.failed = True
        self._static.clear()
        self._pool = None
        self._out = None
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
    def embed(self, batch: PackedBatch, per_token: bool = False) -> Embeddings:
        """Embeds a batch from its bucket's graph (or eagerly when none holds it); as PackedEsm2.embed."""
        tokens = self.bucket_for(batch, per_token)
        if tokens is None:
            self.eager_batches += 1
            result = self.model.embed(batch, self.layers, self.pooling, per_token)
            self.launched_at = self.model.launched_at
            return result
        st = self._static[(tokens, per_token)]
        n = self._fill(st, batch, per_token)
        out = self._output(st, per_token)
        if st.graph is not None:
            self._replay(st)
        else:
            self._forward(st, per_token, out=out)
        self.graph_batches += 1
        self.launched_at = time.perf_counter()  # the host's part ends here: benchmarks read it (host ms a forward)
        # A copy, never a view: the next batch overwrites the shared buffer (on the CPU .cpu() would not copy).
        return split_host(out[:n].to("cpu", copy=True).numpy(), batch, self.layers, per_token, [])
