"""Packed batches: proteins' tokens concatenated with cumulative lengths, described on the host before a batch
starts (no pad token is ever computed), moved to the device in one copy per dtype, and split back on the host.

The forward (esm2cli.model.forward) never asks the device for a length or an offset: every index it uses is here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from esm2cli.io.schema import Embeddings
from esm2cli.model.invariant import PoolPlan, pool_plan, width_groups

MASK_RATIO_TRAIN = 0.15 * 0.8  # ESM-2's token dropout: the share of masked tokens in every training run
# Host cost of one attention group per layer (gather, SDPA call, scatter), in attention score pairs: a new
# group pays off once it saves more padded pairs than this. Measured on the CPU (benchmarks/forward_ab.py).
GROUP_OVERHEAD_PAIRS = 32768


# ----------------------------------------------------------------------------------------------------------
# The batch, described on the host


@dataclass(frozen=True)
class PackedBatch:
    """A batch of proteins, packed: their tokens concatenated, with everything the forward indexes by.

    Built on the host with numpy before the batch starts, so that the forward never asks the device for a
    length or an offset.

    Attributes:
        tokens: (T,) int64 token ids, ``<cls> residues <eos>`` per protein, back to back.
        positions: (T,) int64 position of each token in its protein (0 is <cls>): the rotary index.
        cu_seqlens: (B + 1,) int64 offsets of the proteins in ``tokens`` (0 first, T last).
        lengths: (B,) int64 residues per protein (tokens minus <cls> and <eos>).
        scale: (T,) float32 token-dropout factor of each token (0 for <mask>; all 1 without token dropout).
    """

    tokens: np.ndarray
    positions: np.ndarray
    cu_seqlens: np.ndarray
    lengths: np.ndarray
    scale: np.ndarray

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def seq_tokens(self) -> np.ndarray:
        """(B,) tokens per protein, <cls> and <eos> included."""
        return np.diff(self.cu_seqlens)

    @property
    def max_len(self) -> int:
        """The widest protein in tokens (a Python int, known before the forward)."""
        return int(self.seq_tokens.max())

    @classmethod
    def from_token_ids(cls, ids: Sequence[np.ndarray], *, mask_id: int, token_dropout: bool = True) -> PackedBatch:
        """Packs proteins given as token ids, each ``<cls> residues <eos>`` (no padding).

        Args:
            ids: One 1-D integer array per protein, its special tokens included.
            mask_id: The <mask> token id (zeroed and counted by token dropout).
            token_dropout: The model's ``token_dropout`` flag.

        Returns:
            The packed batch.
        """
        if not ids:
            raise ValueError("an empty batch; this is a bug")
        tokens = np.concatenate([np.asarray(t, dtype=np.int64) for t in ids])
        sizes = np.array([len(t) for t in ids], dtype=np.int64)
        if sizes.min() < 2:
            raise ValueError("a protein without <cls> and <eos>; this is a bug")
        cu = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(sizes, out=cu[1:])
        positions = np.arange(len(tokens), dtype=np.int64) - np.repeat(cu[:-1], sizes)
        scale = np.ones(len(tokens), dtype=np.float32)
        if token_dropout:
            masked = tokens == mask_id
            # As ESM-2: observed mask share over the protein's tokens, specials included.
            share = np.add.reduceat(masked, cu[:-1]).astype(np.float64) / sizes
            factor = (1.0 - MASK_RATIO_TRAIN) / (1.0 - share)
            scale = np.repeat(factor, sizes).astype(np.float32)
            scale[masked] = 0.0
        return cls(tokens, positions, cu, sizes - 2, scale)

    @classmethod
    def from_sequences(
        cls,
        seqs: Sequence[str],
        token_lut: np.ndarray,
        *,
        cls_id: int,
        eos_id: int,
        mask_id: int,
        token_dropout: bool = True,
        masked: Sequence[int | None] | None = None,
    ) -> PackedBatch:
        """Packs validated residue strings (upper-case ASCII), optionally with one residue masked each.

        Args:
            seqs: Residue strings.
            token_lut: Maps an ASCII code to its token id (``LoadedModel.token_lut``).
            cls_id, eos_id, mask_id: Special token ids.
            token_dropout: The model's ``token_dropout`` flag.
            masked: Per protein, the 0-based residue replaced by <mask> (None: nothing masked).

        Returns:
            The packed batch.
        """
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        sizes = lengths + 2
        cu = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(sizes, out=cu[1:])
        residues = token_lut[np.frombuffer("".join(seqs).encode("ascii"), dtype=np.uint8)]
        tokens = np.empty(int(cu[-1]), dtype=np.int64)
        keep = np.ones(len(tokens), dtype=bool)
        keep[cu[:-1]] = False
        keep[cu[1:] - 1] = False
        tokens[keep] = residues
        tokens[cu[:-1]] = cls_id
        tokens[cu[1:] - 1] = eos_id
        if masked is not None:
            for i, pos in enumerate(masked):
                if pos is not None:
                    tokens[cu[i] + 1 + pos] = mask_id
        return cls.from_token_ids(np.split(tokens, cu[1:-1]), mask_id=mask_id, token_dropout=token_dropout)

    def residue_rows(self) -> np.ndarray:
        """(R,) int64 packed row of every residue, protein by protein (no <cls>, no <eos>)."""
        keep = np.ones(self.num_tokens, dtype=bool)
        keep[self.cu_seqlens[:-1]] = False
        keep[self.cu_seqlens[1:] - 1] = False
        return np.flatnonzero(keep)

    def rows(self, seq: int, residues: Sequence[int] | np.ndarray) -> np.ndarray:
        """Packed rows of 0-based residue positions of protein ``seq`` (for reading the LM head)."""
        return self.cu_seqlens[seq] + 1 + np.asarray(residues, dtype=np.int64)


def attention_groups(seq_tokens: np.ndarray, overhead_pairs: int = GROUP_OVERHEAD_PAIRS) -> list[np.ndarray]:
    """Splits a batch's proteins into groups run by one padded attention call each.

    Proteins are sorted by length and cut into consecutive runs minimising the padded score pairs
    (members x widest^2) plus ``overhead_pairs`` per group: uniform batches make one group, mixed ones a few.

    Args:
        seq_tokens: Tokens per protein.
        overhead_pairs: The cost of one more group, in score pairs.

    Returns:
        The protein indices of each group.
    """
    order = np.argsort(seq_tokens, kind="stable")
    width = seq_tokens[order].astype(np.float64)
    n = len(order)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):  # the group ending at `end` (exclusive) starts at cut[end]
        starts = np.arange(end)
        costs = best[:end] + (end - starts) * width[end - 1] ** 2 + overhead_pairs
        cut[end] = int(np.argmin(costs))
        best[end] = costs[cut[end]]
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


# ----------------------------------------------------------------------------------------------------------
# The batch, on the device


@dataclass
class GroupPlan:
    """One padded attention group: gather rows, key mask, and where the real rows go back."""

    gather: torch.Tensor  # (n, W) packed row per padded slot (pads point at a real row, masked as keys)
    key_mask: torch.Tensor | None  # (n, 1, 1, W) bool, True = attend; None when every member is W wide
    slots: torch.Tensor | None  # flat slot index of each real token in (n*W); None when no padding
    dest: torch.Tensor  # packed row of each real token, in slot order


@dataclass
class DeviceBatch:
    """A PackedBatch's indices on the device, moved there in one copy per dtype.

    Attributes:
        host: The batch described on the host (None for a CUDA graph's static inputs).
        tokens, positions, scale, cu_seqlens (int32): As the PackedBatch.
        pool_index: (T,) int64 protein of each residue token, B for <cls> and <eos> (mean pooling by
            ``index_add_``, the forward that is not batch-invariant).
        inv_lengths: (B + 1,) float32 1 / residues per protein (0 for the dump row B).
        bos_rows: (B,) int64 packed row of each <cls>.
        residue_rows: (R,) int64 packed row of each residue.
        num_seqs: B, the pooled rows (a CUDA graph's: its slots).
        max_len: The widest protein in tokens.
        groups: Padded attention groups (the SDPA path only).
        pool: Mean pooling's indices (esm2cli.model.invariant.pool_plan); None: pool by ``pool_index``.
    """

    host: PackedBatch | None
    tokens: torch.Tensor
    positions: torch.Tensor
    scale: torch.Tensor
    cu_seqlens: torch.Tensor
    pool_index: torch.Tensor
    inv_lengths: torch.Tensor
    bos_rows: torch.Tensor
    residue_rows: torch.Tensor
    num_seqs: int
    max_len: int
    groups: list[GroupPlan] = field(default_factory=list)
    pool: PoolPlan | None = None  # mean pooling's fixed-order sums (the batch-invariant forward)


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


Buffer = TypeVar("Buffer", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class Layout:
    """The named fields of one flat buffer, in order, with their sizes: the one place a buffer is cut.

    A batch's indices travel to the device in one int64 and one float32 buffer; what is where in them is
    said here once, and both the packing and the splitting read it, so that adding a field is one edit and a
    field of the wrong size is an error instead of shifted vectors.
    """

    fields: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, sizes: Mapping[str, int]) -> Layout:
        return cls(tuple((name, int(size)) for name, size in sizes.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.fields)

    def slices(self) -> dict[str, slice]:
        out, at = {}, 0
        for name, size in self.fields:
            out[name] = slice(at, at + size)
            at += size
        return out

    def split(self, flat: Buffer) -> dict[str, Buffer]:
        """Views of each field of a buffer laid out by this layout (numpy or torch)."""
        if len(flat) != self.total:
            raise ValueError(f"a buffer of {len(flat)} values for a layout of {self.total}; this is a bug")
        return {name: flat[cut] for name, cut in self.slices().items()}

    def pack(self, arrays: Mapping[str, np.ndarray], dtype: type | np.dtype) -> np.ndarray:
        """One flat host array of the fields, each checked against its size."""
        if tuple(arrays) != self.names:
            raise ValueError(f"fields {list(arrays)} for a layout of {list(self.names)}; this is a bug")
        for name, size in self.fields:
            if len(arrays[name]) != size:
                raise ValueError(f"field {name} has {len(arrays[name])} values, its layout {size}; this is a bug")
        if not self.fields:
            return np.zeros(0, dtype=dtype)
        return np.concatenate([np.asarray(arrays[name], dtype=dtype) for name in self.names])


@dataclass(frozen=True)
class BatchLayout:
    """Where each index of a batch sits in its two device buffers (int64 and float32).

    Attributes:
        ints: tokens, positions (T each), cu_seqlens (segments + 1), pool_index (T), bos_rows (B),
            residue_rows (R), then ``extra`` int fields (a CUDA graph's ``keep`` rows, attention groups).
        floats: scale (T), inv_lengths (B + 1).
    """

    ints: Layout
    floats: Layout

    @classmethod
    def sized(
        cls, *, tokens: int, seqs: int, segments: int, residues: int, extra: Mapping[str, int] | None = None
    ) -> BatchLayout:
        """The layout of a batch of ``tokens`` tokens, ``seqs`` pooled rows, ``segments`` attention segments."""
        ints = {
            "tokens": tokens,
            "positions": tokens,
            "cu_seqlens": segments + 1,
            "pool_index": tokens,
            "bos_rows": seqs,
            "residue_rows": residues,
            **(extra or {}),
        }
        return cls(Layout.of(ints), Layout.of({"scale": tokens, "inv_lengths": seqs + 1}))


def plan_groups(
    sizes: np.ndarray, starts: np.ndarray, *, invariant: bool = True
) -> tuple[dict[str, np.ndarray], list[tuple]]:
    """Host arrays of each attention group, as named int fields, and their shapes for reading them back.

    Batch-invariant (the default): proteins of one attention-width rung together, each padded to that rung
    (``invariant.width_groups``), so that a protein's attention shape is fixed by its own length. Otherwise
    the groups that cost least for this batch (``attention_groups``), padded to their widest member.
    Segments of zero tokens (unused slots of a CUDA graph's batch) are left out.
    """
    shapes, fields = [], {}
    used = np.flatnonzero(sizes > 0)
    if invariant:
        plan = width_groups(sizes)
    else:
        plan = [(int(sizes[used[m]].max()), used[m]) for m in attention_groups(sizes[used])]
    for g, (widest, members) in enumerate(plan):
        n = len(members)
        offs = np.arange(widest)
        valid = offs[None, :] < sizes[members][:, None]  # (n, W)
        gather = np.where(valid, starts[members][:, None] + offs[None, :], starts[members][:, None])
        padded = not valid.all()
        slots = np.flatnonzero(valid.reshape(-1))
        fields[f"group{g}.gather"] = gather.reshape(-1)
        fields[f"group{g}.valid"] = valid.reshape(-1).astype(np.int64)
        fields[f"group{g}.dest"] = gather.reshape(-1)[slots]
        if padded:
            fields[f"group{g}.slots"] = slots
        shapes.append((n, widest, padded))
    return fields, shapes


def pool_fields(batch: PackedBatch, **static: int) -> dict[str, np.ndarray]:
    """Mean pooling's fixed-order sums as named int fields (``static``: a CUDA graph's chunks and width)."""
    plan = pool_plan(batch.cu_seqlens[:-1] + 1, batch.lengths, **static)
    return {f"pool.{name}": values for name, values in plan.items()}


def unpack_pool(parts: Mapping[str, torch.Tensor], seqs: int) -> PoolPlan | None:
    """The PoolPlan of a batch's fields (None when it has none)."""
    if "pool.rows" not in parts:
        return None
    return PoolPlan.of(parts["pool.rows"], parts["pool.valid"], parts["pool.chunks"], seqs)


def unpack_groups(parts: Mapping[str, torch.Tensor], shapes: list[tuple]) -> list[GroupPlan]:
    groups = []
    for g, (n, widest, padded) in enumerate(shapes):
        valid = parts[f"group{g}.valid"]
        key_mask = valid.view(n, 1, 1, widest).bool() if padded else None
        slots = parts[f"group{g}.slots"] if padded else None
        groups.append(GroupPlan(parts[f"group{g}.gather"].view(n, widest), key_mask, slots, parts[f"group{g}.dest"]))
    return groups


def device_batch(
    host: PackedBatch | None,
    ints: Mapping[str, torch.Tensor],
    floats: Mapping[str, torch.Tensor],
    *,
    num_seqs: int,
    max_len: int,
    groups: list[GroupPlan] | None = None,
) -> DeviceBatch:
    """A DeviceBatch over the fields of its two buffers (split by their BatchLayout), pooling plan included."""
    return DeviceBatch(
        host=host,
        tokens=ints["tokens"],
        positions=ints["positions"],
        scale=floats["scale"],
        cu_seqlens=ints["cu_seqlens"].to(torch.int32),
        pool_index=ints["pool_index"],
        inv_lengths=floats["inv_lengths"],
        bos_rows=ints["bos_rows"],
        residue_rows=ints["residue_rows"],
        num_seqs=num_seqs,
        max_len=max_len,
        groups=groups or [],
        pool=unpack_pool(ints, num_seqs),
    )


def to_device(batch: PackedBatch, device: torch.device | str, *, groups: bool, invariant: bool = True) -> DeviceBatch:
    """Moves a batch's indices to ``device``: one int64 and one float32 transfer (pinned, non-blocking on CUDA).

    Args:
        batch: The packed batch.
        device: Where the model is.
        groups: Also plan padded attention groups (the SDPA attention path).
        invariant: Plan them, and mean pooling, batch-invariantly (see plan_groups, invariant.mean_pool).
    """
    device = torch.device(device)
    b, t = batch.num_seqs, batch.num_tokens
    pool_index = np.full(t, b, dtype=np.int64)
    residue_rows = batch.residue_rows()
    pool_index[residue_rows] = np.repeat(np.arange(b), batch.lengths)
    group_fields: dict[str, np.ndarray] = {}
    shapes: list[tuple] = []
    if groups:
        group_fields, shapes = plan_groups(batch.seq_tokens, batch.cu_seqlens[:-1], invariant=invariant)
    if invariant:
        group_fields.update(pool_fields(batch))
    layout = BatchLayout.sized(
        tokens=t, seqs=b, segments=b, residues=len(residue_rows), extra={k: len(v) for k, v in group_fields.items()}
    )
    inv_lengths = np.zeros(b + 1, dtype=np.float32)
    inv_lengths[:b] = 1.0 / np.maximum(batch.lengths, 1)
    ints = {
        "tokens": batch.tokens,
        "positions": batch.positions,
        "cu_seqlens": batch.cu_seqlens,
        "pool_index": pool_index,
        "bos_rows": batch.cu_seqlens[:-1],
        "residue_rows": residue_rows,
        **group_fields,
    }
    flat_i = host_to_device(layout.ints.pack(ints, np.int64), device)
    flat_f = host_to_device(layout.floats.pack({"scale": batch.scale, "inv_lengths": inv_lengths}, np.float32), device)
    parts = layout.ints.split(flat_i)
    return device_batch(
        batch, parts, layout.floats.split(flat_f), num_seqs=b, max_len=batch.max_len,
        groups=unpack_groups(parts, shapes),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# What a batch gives back


def split_host(
    flat: np.ndarray, batch: PackedBatch, layers: Sequence[int], per_token: bool, contacts: list[np.ndarray]
) -> Embeddings:
    """Splits the one host copy made by ``reduce_on_device`` into pooled and per-token arrays (views)."""
    b, r = batch.num_seqs, int(batch.lengths.sum())
    pooled, tokens, at = {}, {}, 0
    bounds = np.cumsum(batch.lengths)[:-1]
    for layer in layers:
        pooled[layer] = flat[at : at + b]
        at += b
        if per_token:
            tokens[layer] = np.split(flat[at : at + r], bounds)
            at += r
    return Embeddings(pooled, tokens, contacts)
