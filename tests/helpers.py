"""Helpers shared by test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from esm2cli.model.packed import PackedBatch

# Lengths chosen to mix: one attention group per length class, padding inside groups, a 1-residue protein.
MIXED_LENGTHS = [1, 5, 17, 40, 41, 120, 7, 300, 64]


def random_seqs(lengths: Sequence[int] = MIXED_LENGTHS, seed: int = 3) -> list[str]:
    """Random residue strings of the given lengths."""
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)) for n in lengths]


def pack(loaded, seqs: Sequence[str], masked=None, token_dropout: bool = True) -> PackedBatch:
    """Packs residue strings with a LoadedModel's tokens."""
    return PackedBatch.from_sequences(
        seqs, loaded.token_lut, cls_id=loaded.cls_id, eos_id=loaded.eos_id, mask_id=loaded.mask_id,
        token_dropout=token_dropout, masked=masked,
    )  # fmt: skip


def header_offsets(data: bytes) -> list[int]:
    """The byte offset of every record's '>' (a '>' opening a line), found straight in the file's bytes."""
    return [i for i in range(len(data)) if data[i : i + 1] == b">" and (i == 0 or data[i - 1 : i] == b"\n")]


def byte_shard_sizes(source: bytes | str | os.PathLike, count: int) -> list[int]:
    """Records per shard when shard i owns the records whose '>' lies in bytes [i*size/count, (i+1)*size/count)."""
    data = source if isinstance(source, bytes) else open(source, "rb").read()
    sizes = [0] * count
    for offset in header_offsets(data):
        sizes[next(i for i in range(count) if offset < (i + 1) * len(data) // count)] += 1
    return sizes
