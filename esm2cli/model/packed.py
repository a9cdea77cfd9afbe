"""Packed batches: proteins' tokens concatenated with cumulative lengths, described on the host before a batch
starts (no pad token is ever computed), moved to the device in one copy per dtype, and split back on the host.

The forward (esm2cli.model.forward) never asks the device for a length or an offset: every index it uses is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

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
        pool_index: (T,) int64 protein of each residue token, B for <cls> and <eos> (mean pooling).
        inv_lengths: (B + 1,) float32 1 / residues per protein (0 for the dump row B).
        bos_rows: (B,) int64 packed row of each <cls>.
        residue_rows: (R,) int64 packed row of each residue.
        num_seqs: B, the pooled rows (a CUDA graph's: its slots).
        max_len: The widest protein in tokens.
        groups: Padded attention groups (the SDPA path only).
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


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def plan_groups(sizes: np.ndarray, starts: np.ndarray, ints: list[np.ndarray]) -> list[tuple]:
    """Host arrays of each attention group, appended to ``ints``; returns their shapes for slicing back.

    Segments of zero tokens (unused slots of a CUDA graph's batch) are left out.
    """
    shapes = []
    used = np.flatnonzero(sizes > 0)
    for members in attention_groups(sizes[used]):
        members = used[members]
        n, widest = len(members), int(sizes[members].max())
        offs = np.arange(widest)
        valid = offs[None, :] < sizes[members][:, None]  # (n, W)
        gather = np.where(valid, starts[members][:, None] + offs[None, :], starts[members][:, None])
        padded = not valid.all()
        slots = np.flatnonzero(valid.reshape(-1))
        ints += [gather.reshape(-1), valid.reshape(-1).astype(np.int64), gather.reshape(-1)[slots]]
        if padded:
            ints.append(slots)
        shapes.append((n, widest, padded, len(slots)))
    return shapes


def unpack_groups(pieces, shapes: list[tuple]) -> list[GroupPlan]:
    groups = []
    for n, widest, padded, _ in shapes:
        gather, valid, dest = next(pieces), next(pieces), next(pieces)
        slots = next(pieces) if padded else None
        key_mask = valid.view(n, 1, 1, widest).bool() if padded else None
        groups.append(GroupPlan(gather.view(n, widest), key_mask, slots, dest))
    return groups


def to_device(batch: PackedBatch, device: torch.device | str, *, groups: bool) -> DeviceBatch:
    """Moves a batch's indices to ``device``: one int64 and one float32 transfer (pinned, non-blocking on CUDA).

    Args:
        batch: The packed batch.
        device: Where the model is.
        groups: Also plan padded attention groups (the SDPA attention path).
    """
    device = torch.device(device)
    b, t = batch.num_seqs, batch.num_tokens
    pool_index = np.full(t, b, dtype=np.int64)
    residue_rows = batch.residue_rows()
    pool_index[residue_rows] = np.repeat(np.arange(b), batch.lengths)
    ints = [batch.tokens, batch.positions, batch.cu_seqlens, pool_index, batch.cu_seqlens[:-1], residue_rows]
    shapes = plan_groups(batch.seq_tokens, batch.cu_seqlens[:-1], ints) if groups else []
    inv_lengths = np.zeros(b + 1, dtype=np.float32)
    inv_lengths[:b] = 1.0 / np.maximum(batch.lengths, 1)
    flat_i = host_to_device(np.concatenate(ints), device)
    flat_f = host_to_device(np.concatenate([batch.scale, inv_lengths]), device)
    pieces = iter(torch.split(flat_i, [len(a) for a in ints]))
    out = DeviceBatch(
        host=batch,
        tokens=next(pieces),
        positions=next(pieces),
        cu_seqlens=next(pieces).to(torch.int32),
        pool_index=next(pieces),
        bos_rows=next(pieces),
        residue_rows=next(pieces),
        scale=flat_f[:t],
        inv_lengths=flat_f[t:],
        num_seqs=b,
        max_len=batch.max_len,
    )
    out.groups = unpack_groups(pieces, shapes)
    return out


# ----------------------------------------------------------------------------------------------------------
# What a batch gives back


@dataclass
class EmbedResult:
    """A batch's outputs on the host, float32, in the batch's order (the fields of model.BatchEmbeddings).

    Attributes:
        pooled: Layer -> (B, hidden) array.
        per_token: Layer -> one (residues, hidden) array per protein; empty unless asked.
        contacts: One (residues, residues) contact-probability array per protein; empty unless asked.
    """

    pooled: dict[int, np.ndarray]
    per_token: dict[int, list[np.ndarray]]
    contacts: list[np.ndarray] = field(default_factory=list)


def split_host(
    flat: np.ndarray, batch: PackedBatch, layers: Sequence[int], per_token: bool, contacts: list[np.ndarray]
) -> EmbedResult:
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
    return EmbedResult(pooled, tokens, contacts)
