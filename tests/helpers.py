"""Helpers shared by several test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import os


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
