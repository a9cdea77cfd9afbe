"""Batch-invariant primitives: a protein's numbers computed from the protein alone, whatever shares its batch.

Libraries pick a kernel (its blocking, its split of a reduction across threads or thread blocks) from the
shapes of a call, so a row computed in a call of 300 rows may be summed in another order than the same row in
a call of 3,000. Every op the forwards run over packed tokens therefore sees shapes fixed by the protein's own
length or by a constant:

- ``tiled_linear``: matmuls on tiles of exactly ``ROW_TILE`` rows (each tile its own gemm of one fixed shape:
  one batched call, or one call a tile in half precision on the CPU); the last tile padded (``padded_rows``).
  Measured on the CPU (oneDNN/MKL): a single call's rows change with the call's row count (below ~256 rows, or
  with the thread count for a long reduction such as the feed-forward's second matmul), a 256-row tile's rows
  never do (tests/model/test_invariant.py).
- ``attention_width`` and ``width_groups``: padded attention (SDPA on the CPU) runs a protein at the width of
  its own length's rung, grouped only with proteins of the same rung, never at the width of its widest mate.
- ``mean_pool``: each protein's residue rows summed in one fixed binary tree: chunks of ``POOL_CHUNK`` rows
  from the protein's first residue, then the chunk sums; zero padding (to any larger power of two) leaves the
  tree's sums unchanged, so a CUDA graph's static widths give the eager result. Only elementwise adds: no
  atomics (CUDA ``index_add_``), no reduction over a shape that depends on the batch.

LayerNorm, GELU, rotary and the token-dropout scale (per protein, from its own mask share) are row-wise.
The ESM C forward builds on the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Bumped whenever the forward's arithmetic changes for some device type or dtype (files before the key: 1).
# 2: the CPU's half-precision matmuls run one gemm call a tile instead of one batched call.
FORWARD_REVISION = 2
ROW_TILE = 256  # rows per matmul tile (benchmarks/forward_ab.py: 128 costs more calls, 512 more padding)
POOL_CHUNK = 16  # residue rows summed per first-level chunk of mean pooling
WIDTH_STEP = 32  # attention widths: multiples of 32 up to 1,024 tokens,
WIDTH_RUNGS_PER_OCTAVE = 16  # then 16 rungs an octave (as the padded batch widths of runtime.batching)


def padded_rows(rows: int) -> int:
    """Rows allocated for ``rows`` packed tokens: a whole number of matmul tiles (at least one)."""
    return max(1, -(-rows // ROW_TILE)) * ROW_TILE


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zero rows appended up to ``padded_rows`` (``x`` itself when it is already whole tiles)."""
    extra = padded_rows(x.shape[0]) - x.shape[0]
    if not extra:
        return x
    return torch.cat([x, x.new_zeros(extra, *x.shape[1:])])


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` on tiles of ``ROW_TILE`` rows: a row's result does not depend on the other rows.

    Args:
        x: (M, K) rows; M need not be a whole number of tiles (a padded copy is then made: callers that run
            many matmuls pad once, with ``pad_rows``).
        weight: (N, K), as ``F.linear``.
        bias: (N,) or None.

    Returns:
        (M, N) in ``x``'s dtype.
    """
    m = x.shape[0]
    xp = pad_rows(x)
    if x.device.type == "cpu" and x.dtype != torch.float32:
        out = tile_by_tile(xp, weight, bias)
    else:
        out = batched_tiles(xp, weight, bias)
    return out if out.shape[0] == m else out[:m]


def batched_tiles(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Whole tiles as one batched gemm over a stride-0 weight (float32 on the CPU: MKL reads it in place; CUDA)."""
    tiles, k = xp.shape[0] // ROW_TILE, xp.shape[1]
    x3 = xp.reshape(tiles, ROW_TILE, k)
    wt = weight.t().expand(tiles, k, weight.shape[0])
    out = torch.bmm(x3, wt) if bias is None else torch.baddbmm(bias, x3, wt)
    return out.reshape(tiles * ROW_TILE, weight.shape[0])


def tile_by_tile(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Whole tiles as one gemm call each, written in place (the CPU in half precision).

    oneDNN's half-precision batched gemm copies the stride-0 weight for every tile of the call; one call a tile
    reads it as it is: 0.95x of one plain call against 0.78x for the batched tiles (benchmarks/tile_ab.py).
    """
    out = xp.new_empty(xp.shape[0], weight.shape[0])
    wt = weight.t()
    for start in range(0, xp.shape[0], ROW_TILE):
        tile, dest = xp[start : start + ROW_TILE], out[start : start + ROW_TILE]
        if bias is None:
            torch.mm(tile, wt, out=dest)
        else:
            torch.addmm(bias, tile, wt, out=dest)
    return out


def attention_width(tokens: int) -> int:
    """The padded attention width of a protein of ``tokens`` tokens: its own length's rung, nobody else's."""
    n = max(int(tokens), 1)
    octave_top = 1 << (n - 1).bit_length()
    unit = max(WIDTH_STEP, octave_top // (2 * WIDTH_RUNGS_PER_OCTAVE))
    return -(-n // unit) * unit


def width_groups(seq_tokens: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The proteins of a batch grouped by attention width (segments of zero tokens left out).

    Returns:
        (width, protein indices in batch order) per width, narrowest first.
    """
    used = np.flatnonzero(seq_tokens > 0)
    widths = np.array([attention_width(t) for t in seq_tokens[used]], dtype=np.int64)
    return [(int(w), used[widths == w]) for w in np.unique(widths)]


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def pool_plan(
    first_rows: np.ndarray, lengths: np.ndarray, *, chunks: int | None = None, width: int | None = None
) -> dict[str, np.ndarray]:
    """Host indices of mean pooling's fixed-order sums (see ``mean_pool``).

    Args:
        first_rows: (B,) packed row of each protein's first residue.
        lengths: (B,) residues per protein.
        chunks: Chunk slots to lay out (None: as many as the proteins need); a CUDA graph's static count.
        width: Chunk slots per protein (None: the power of two holding the batch's most); static for graphs.

    Returns:
        ``rows`` (chunks * POOL_CHUNK) packed row of each summed slot (0 where padding), ``valid`` (the same
        size, 1 for a real residue), ``chunks`` (B * width) chunk of each protein's slot (``chunks`` itself,
        a zero row, where padding).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    per = -(-lengths // POOL_CHUNK)
    used = int(per.sum())
    slots = used if chunks is None else chunks
    wide = _pow2(max(int(per.max(initial=0)), 1)) if width is None else width
    if used > slots or per.max(initial=0) > wide:
        raise ValueError(f"{used} pooling chunks for {slots} slots of width {wide}; this is a bug")
    owner = np.repeat(np.arange(len(lengths)), per)
    nth = np.arange(used) - np.repeat(np.cumsum(per) - per, per)
    offs = POOL_CHUNK * nth[:, None] + np.arange(POOL_CHUNK)[None, :]  # (used, C) residue index in its protein
    valid = np.zeros((slots, POOL_CHUNK), dtype=np.int64)
    rows = np.zeros((slots, POOL_CHUNK), dtype=np.int64)
    valid[:used] = offs < lengths[owner][:, None]
    rows[:used] = np.where(valid[:used] > 0, first_rows[owner][:, None] + offs, 0)
    table = np.full((len(lengths), wide), slots, dtype=np.int64)
    table[owner, nth] = np.arange(used)
    return {"rows": rows.reshape(-1), "valid": valid.reshape(-1), "chunks": table.reshape(-1)}


@dataclass
class PoolPlan:
    """Mean pooling's indices on the device: (slots, C) rows and their validity, (B, width) chunk table."""

    rows: torch.Tensor
    valid: torch.Tensor
    chunks: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor, valid: torch.Tensor, chunks: torch.Tensor, seqs: int) -> PoolPlan:
        """Views of the three flat fields of ``pool_plan``, for a batch of ``seqs`` pooled rows."""
        return cls(rows.view(-1, POOL_CHUNK), valid.view(-1, POOL_CHUNK, 1).bool(), chunks.view(seqs, -1))


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sums (n, P, H) over P (a power of two) by halves, a fixed binary tree of elementwise adds: (n, H)."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = x[:, :half] + x[:, half:]
    return x[:, 0]


def mean_pool(hidden: torch.Tensor, plan: PoolPlan, inv_lengths: torch.Tensor) -> torch.Tensor:
    """Each protein's mean over its residue rows, summed in a fixed order: (B, H) float32.

    Args:
        hidden: (T, H) float32 packed rows.
        plan: The batch's PoolPlan.
        inv_lengths: (>= B,) float32 1 / residues per protein.
    """
    slots, width = plan.rows.shape[0], plan.chunks.shape[1]
    h = hidden.shape[1]
    rows = hidden.index_select(0, plan.rows.reshape(-1)).view(slots, POOL_CHUNK, h)
    sums = tree_sum(torch.where(plan.valid, rows, 0.0))
    sums = torch.cat([sums, sums.new_zeros(1, h)])  # the padding chunk
    seqs = plan.chunks.shape[0]
    total = tree_sum(sums.index_select(0, plan.chunks.reshape(-1)).view(seqs, width, h))
    return total * inv_lengths[:seqs, None]
