"""A chunk's work: identical sequences embedded once, long proteins in windows stitched back, rows in input order."""

from __future__ import annotations

import numpy as np

from esm2cli.config import EmbedConfig
from esm2cli.io.chunks import Chunk
from esm2cli.io.records import Record
from esm2cli.io.schema import Embeddings
from esm2cli.jobs.chunking import ChunkWork, Deduplicated

WINDOW = EmbedConfig(truncate=4, long_sequences="window", window_overlap=2, per_token=True)


def _records(*seqs: str) -> list[Record]:
    return [Record(f"r{i}", "", seq, i + 1) for i, seq in enumerate(seqs)]


def _token_vectors(seq: str) -> np.ndarray:
    """Residue i of any sequence: the vector (code of its letter, 1): what a window shows is its own residues."""
    return np.array([[ord(ch), 1.0] for ch in seq], np.float32)


def test_identical_sequences_and_windows_are_items_once():
    plan = Deduplicated.of(_records("MKV", "MKV", "ACDEFG", "W"), WINDOW)
    assert plan.items == ["MKV", "ACDE", "DEFG", "W"]  # ACDEFG: windows at 0 and 2 (width 4, overlap 2)
    assert plan.parts == [[0], [0], [1, 2], [3]] and plan.starts == [None, None, [0, 2], None]
    assert plan.owners[0] == [0, 1] and plan.uses[2] == [(2, 2)]


def test_results_filled_in_any_order_give_rows_in_input_order_with_windows_stitched():
    records = _records("MKV", "ACDEFG", "MKV", "W")
    work = ChunkWork.of(Chunk(0, 4, "0" * 64), records, WINDOW)
    order = list(reversed(range(len(work.items))))
    for i in order:  # one item a batch, the last first
        tokens = _token_vectors(work.items[i])
        work.fill([i], Embeddings({-1: tokens.mean(axis=0, keepdims=True)}, {-1: [tokens]}))
    assert work.missing == 0
    rows = work.rows()
    assert rows.ids == ["r0", "r1", "r2", "r3"] and rows.windows == [1, 2, 1, 1]
    for row, record in enumerate(records):  # a stitched protein equals its residues embedded whole
        np.testing.assert_allclose(rows.pooled[-1][row], _token_vectors(record.sequence).mean(axis=0), rtol=1e-6)
        np.testing.assert_array_equal(rows.per_token[-1][row], _token_vectors(record.sequence))
    assert rows.truncated == [False] * 4
