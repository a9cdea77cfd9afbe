"""Modeled GPUs: replicas that run no model and take, for each batch, the time a named card would take.

Everything around them is real (reading, checks, sorting, tokenising, the outputs' shape, Parquet), so
that a machine without GPUs can measure whether its host keeps N fast GPUs busy. A batch is held for

    packed_flops(batch) / (card's published peak in the run's dtype x MFU) + per-call overhead

waiting on a clock that releases the GIL, as a thread waiting on CUDA kernels does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from esm2cli.config import GPU_PEAKS, EmbedConfig, ModeledGPU
from esm2cli.runtime.batching import SPECIAL_TOKENS, token_bucket

_OUTPUT_ROWS = 251  # distinct placeholder vectors (a prime: rows of different lengths rarely repeat)


def model_flops(lengths: Sequence[int], layers: int, hidden: int, *, ffn_weights: int | None = None) -> float:
    """Forward FLOPs on these sequences (<cls> and <eos> counted, padding not).

    Per layer and sequence of T tokens: 2·(4·h² + F)·T for the four attention projections and the
    feed-forward's F weights, plus 4·h·T² for the attention scores and their weighted sum. ESM-2's 4h GELU
    feed-forward has F = 8·h² (24·h²·T in all, the default); ESM C's SwiGLU block has F = 3·h·f (gate, up and
    down projections of its hidden size f: LoadedModel.ffn_weights).
    """
    total = 0.0
    for n in lengths:
        t = n + SPECIAL_TOKENS
        total += layers * (_dense_flops(hidden, ffn_weights) * t + 4 * hidden * t * t)
    return total


def _dense_flops(hidden: int, ffn_weights: int | None) -> int:
    """Matmul FLOPs a layer spends on one token row: 2·(4·h² + F) (see model_flops)."""
    return 2 * (4 * hidden * hidden + (8 * hidden * hidden if ffn_weights is None else ffn_weights))


def packed_flops(lengths: Sequence[int], layers: int, hidden: int, *, ffn_weights: int | None = None) -> float:
    """FLOPs a card spends on a packed batch, as esm2cli's forward runs it: the matmuls over the batch's tokens
    rounded up to its CUDA graph's token bucket (runtime.batching.token_bucket), attention per protein."""
    if not lengths:
        return 0.0
    tokens = sum(n + SPECIAL_TOKENS for n in lengths)
    padding = token_bucket(tokens) - tokens  # rows the matmuls run beyond the real tokens, with no attention
    return (
        model_flops(lengths, layers, hidden, ffn_weights=ffn_weights)
        + layers * _dense_flops(hidden, ffn_weights) * padding
    )


def call_seconds(
    lengths: Sequence[int], layers: int, hidden: int, gpu: ModeledGPU, dtype: str, *, ffn_weights: int | None = None
) -> float:
    """How long the modeled card holds one batch: packed FLOPs / (peak x MFU) + overhead."""
    peak = GPU_PEAKS[gpu.card][dtype]
    flops = packed_flops(lengths, layers, hidden, ffn_weights=ffn_weights)
    return flops / (peak * gpu.mfu) + gpu.overhead_ms / 1000


def _hold_gil(seconds: float) -> None:
    """``seconds`` of pure-Python work, counted in this thread's CPU time: it holds the GIL as the Python
    side of a kernel launch loop does, and waits its turn when another thread has it."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class ModeledReplica:
    """A replica on a modeled GPU: real tokenisation, modeled device time, placeholder float32 outputs.

    Attributes:
        calls: Batches run.
        held_s: Modeled device seconds, summed over the batches.
        flops: Model FLOPs of the real tokens run (padding not counted).
        first_start, last_end: perf_counter() when the first batch reached the device and the last left it.
        oom_splits: Always 0 (the engine reports it for every replica).
    """

    def __init__(self, loaded, device, embed: EmbedConfig, gpu: ModeledGPU, dtype: str):
        from esm2cli.runtime.replica import resolve_layers

        if dtype not in GPU_PEAKS[device.card]:
            raise ValueError(f"no {dtype} peak for {device.card}; this is a bug")
        self.device = device
        self.loaded = loaded
        self.gpu = replace(gpu, card=device.card)
        self.dtype = dtype
        self.layers = resolve_layers(embed.layers, loaded.num_layers)
        self.per_token = embed.per_token
        self.calls = 0
        self.held_s = 0.0
        self.flops = 0.0  # model FLOPs of the real tokens (padding not counted), as MFU counts them
        self.first_start: float | None = None
        self.last_end = 0.0
        self.oom_splits = 0
        self._clock = threading.Event()  # never set: wait(timeout) is a sleep that releases the GIL
        rng = np.random.default_rng(len(device.name))
        self._rows = rng.standard_normal((_OUTPUT_ROWS, loaded.hidden_size), dtype=np.float32)

    def seconds(self, lengths: Sequence[int]) -> float:
        """The modeled device time of a batch of sequences of these lengths."""
        loaded = self.loaded
        return call_seconds(
            lengths, loaded.num_layers, loaded.hidden_size, self.gpu, self.dtype, ffn_weights=loaded.ffn_weights
        )

    def embed_batch(self, seqs: Sequence[str], per_token: bool | None = None):
        """Tokenises the batch, holds it for the card's modeled time, and returns placeholder embeddings.

        Args:
            seqs: Upper-case residue strings.
            per_token: Also return per-residue vectors (None: as the EmbedConfig says).

        Returns:
            Embeddings of the real shapes (float32, on the CPU); row values depend on the length only.
        """
        from esm2cli.io.schema import Embeddings
        from esm2cli.model.load import token_ids
        from esm2cli.runtime.batching import padded_width

        # The host work a real replica does before its forward.
        token_ids(self.loaded, seqs, padded_width(max(map(len, seqs))))
        lengths = [len(s) for s in seqs]
        hold = self.seconds(lengths)
        start = time.perf_counter()
        if self.first_start is None:
            self.first_start = start
        if self.gpu.launch_ms:
            _hold_gil(self.gpu.launch_ms / 1000)  # launches overlap the kernels they queue
        remaining = start + hold - time.perf_counter()
        if remaining > 0:
            self._clock.wait(remaining)
        self.last_end = time.perf_counter()
        self.calls += 1
        self.held_s += hold
        self.flops += model_flops(
            lengths, self.loaded.num_layers, self.loaded.hidden_size, ffn_weights=self.loaded.ffn_weights
        )
        picks = np.asarray(lengths) % _OUTPUT_ROWS
        pooled = {layer: self._rows[picks] for layer in self.layers}  # fancy indexing: a fresh copy
        tokens = {}
        if self.per_token if per_token is None else per_token:
            tokens = {layer: [self._rows[np.arange(n) % _OUTPUT_ROWS] for n in lengths] for layer in self.layers}
        return Embeddings(pooled, tokens)


def build_modeled_replicas(loaded, devices, embed: EmbedConfig, gpu: ModeledGPU, dtype: str) -> list[ModeledReplica]:
    """One modeled replica per modeled device."""
    return [ModeledReplica(loaded, device, embed, gpu, dtype) for device in devices]
