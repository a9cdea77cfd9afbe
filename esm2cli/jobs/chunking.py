"""Chunks of work: records cut into chunks (by count, compute and bytes), and what one chunk computes
(identical sequences once, long proteins as windows) and gives back as rows, in input order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from esm2cli.config import (
    FIRST_CHUNK_RESIDUES,
    BatchConfig,
    EmbedConfig,
)
from esm2cli.io.chunks import Chunk
from esm2cli.io.records import Record
from esm2cli.io.schema import Rows
from esm2cli.jobs.reuse import ReusedRows, row_hashes
from esm2cli.runtime.replica import BatchEmbeddings
from esm2cli.runtime.windows import (
    WindowSums,
    computed_residues,
    stitch_pooled,
    window_starts,
)


@dataclass
class ChunkWork:
    """The valid records of one chunk, embedded together; written once every item is back.

    Each record becomes one item (its sequence, truncated) or, for a long protein in window mode,
    one item per window. Identical items are embedded once: ``items`` holds each distinct sequence,
    ``parts[row]`` the items a row is made of, and ``starts[row]`` where its windows start (None
    for a record that is one item).
    """

    chunk: Chunk
    records: list[Record]
    embed: EmbedConfig
    items: list[str]
    parts: list[list[int]]
    starts: list[list[int] | None]
    windowed: set[int]
    uses: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # window item -> (row, start) per use
    pooled: dict[int, np.ndarray] = field(default_factory=dict)
    tokens: dict[int, list] = field(default_factory=dict)  # per-token vectors of items that are a whole row
    sums: dict[int, WindowSums] = field(default_factory=dict)  # windowed row -> its sums, until complete
    stitched: dict[int, dict] = field(default_factory=dict)  # windowed row -> {layer: (pooled, tokens or None)}
    contacts: dict[int, np.ndarray] = field(default_factory=dict)  # item -> contact map, with --contacts
    missing: int = 0
    owners: list[list[int]] = field(default_factory=list)  # item -> the rows using it (once per use)
    row_missing: list[int] = field(default_factory=list)  # row -> its distinct items not back yet
    reused: ReusedRows | None = None  # the chunk's rows copied from earlier outputs (--reuse); records are the rest

    @classmethod
    def of(cls, chunk: Chunk, records: list[Record], embed: EmbedConfig) -> ChunkWork:
        index: dict[str, int] = {}
        parts: list[list[int]] = []
        starts: list[list[int] | None] = []
        uses: dict[int, list[tuple[int, int]]] = {}

        def item(seq: str) -> int:
            return index.setdefault(seq, len(index))

        for record in records:
            seq, width = record.sequence, embed.truncate
            if embed.long_sequences == "window" and len(seq) > width:
                begins = window_starts(len(seq), width, embed.window_overlap)
                ids = [item(seq[b : b + width]) for b in begins]
                for i, begin in zip(ids, begins, strict=True):
                    uses.setdefault(i, []).append((len(parts), begin))
                parts.append(ids)
                starts.append(begins)
            else:
                parts.append([item(seq[:width])])
                starts.append(None)
        work = cls(chunk, records, embed, list(index), parts, starts, set(uses), uses=uses, missing=len(index))
        work.owners = [[] for _ in index]
        for row, ids in enumerate(parts):
            for i in ids:
                work.owners[i].append(row)
        work.row_missing = [len(set(ids)) for ids in parts]
        return work

    def truncated_flags(self) -> list[bool]:
        """Per row: truncated (longer than the window, and not embedded in windows)."""
        width = self.embed.truncate
        return [s is None and len(r.sequence) > width for r, s in zip(self.records, self.starts, strict=True)]

    @property
    def windowed_records(self) -> int:
        return sum(s is not None for s in self.starts)

    def fill(self, items: list[int], result: BatchEmbeddings) -> tuple[int, int]:
        """Stores a batch's results; returns (rows now complete, residues embedded for rows)."""
        for layer, matrix in result.pooled.items():
            if layer not in self.pooled:
                self.pooled[layer] = np.empty((len(self.items), matrix.shape[1]), dtype=np.float32)
            self.pooled[layer][items] = matrix
        for layer, arrays in result.per_token.items():
            slots = self.tokens.setdefault(layer, [None] * len(self.items))
            for i, array in zip(items, arrays, strict=True):
                windows = self.uses.get(i, ())
                if self.embed.per_token and len(windows) < len(self.owners[i]):  # also a whole row of its own
                    slots[i] = array
                for row, begin in windows:  # windows go into their protein's sums at once, never kept
                    self.sums.setdefault(row, WindowSums(len(self.records[row].sequence))).add(layer, begin, array)
        self.contacts.update(zip(items, result.contacts, strict=False))
        self.missing -= len(items)
        done = residues = 0
        for i in items:
            residues += len(self.items[i]) * len(self.owners[i])
            for row in set(self.owners[i]):
                self.row_missing[row] -= 1
                done += self.row_missing[row] == 0
                if self.row_missing[row] == 0 and row in self.sums:
                    self._stitch(row)
        return done, residues

    def _stitch(self, row: int) -> None:
        """A windowed row is complete: its pooled vector (and per-token vectors, if kept) from its sums."""
        sums, ids = self.sums.pop(row), self.parts[row]
        self.stitched[row] = {
            layer: (
                stitch_pooled(self.embed.pooling, tokens := sums.tokens(layer), [matrix[i] for i in ids]),
                tokens if self.embed.per_token else None,
            )
            for layer, matrix in self.pooled.items()
        }  # fmt: skip

    def rows(self) -> Rows:
        recs, embed = self.records, self.embed
        pooled = {layer: np.empty((len(recs), m.shape[1]), np.float32) for layer, m in self.pooled.items()}
        per_token: dict[int, list] = {layer: [] for layer in self.pooled} if embed.per_token else {}
        for row, (ids, begins) in enumerate(zip(self.parts, self.starts, strict=True)):
            for layer, matrix in self.pooled.items():
                if begins is None:
                    pooled[layer][row] = matrix[ids[0]]
                    if embed.per_token:
                        per_token[layer].append(self.tokens[layer][ids[0]])
                    continue
                pooled[layer][row], stitched = self.stitched[row][layer]
                if embed.per_token:
                    per_token[layer].append(stitched)
        rows = Rows(
            ids=[r.id for r in recs],
            descriptions=[r.description for r in recs],
            lengths=[len(r.sequence) for r in recs],
            truncated=self.truncated_flags(),
            pooled=pooled,
            per_token=per_token,
            windows=[len(ids) for ids in self.parts],
            contacts=[self.contacts[ids[0]] for ids in self.parts] if embed.contacts else None,
            sequence_sha256=row_hashes(recs, embed),
        )
        return self.reused.merge(rows) if self.reused is not None else rows


class ChunkLimit:
    """When to close a chunk: at ``chunk_size`` records, about ``commit_seconds`` of compute, or ``chunk_bytes``.

    The compute bound is kept in residues and follows the speed measured so far, so that an
    interruption loses about ``commit_seconds`` of work on any device.
    """

    def __init__(self, batch: BatchConfig, bytes_per_residue: int = 0, bytes_per_record: int = 0):
        self.batch = batch
        self.bytes_per_residue = bytes_per_residue
        self.bytes_per_record = bytes_per_record
        self.residues = FIRST_CHUNK_RESIDUES

    def full(self, records: int, residues: int) -> bool:
        nbytes = records * self.bytes_per_record + residues * self.bytes_per_residue
        return records >= self.batch.chunk_size or residues >= self.residues or nbytes >= self.batch.chunk_bytes

    def observe(self, residues: int, seconds: float) -> None:
        """Resizes the next chunks from the residues computed in ``seconds`` of this run."""
        if residues and seconds > 0:
            self.residues = max(FIRST_CHUNK_RESIDUES, int(residues / seconds * self.batch.commit_seconds))


def split_chunks(
    records: Iterable[Record], earlier: dict[int, Chunk], limit: ChunkLimit, embed: EmbedConfig,
    copied: Callable[[Record], bool] | None = None,
) -> Iterator[tuple[int, int, list[Record], Chunk | None]]:  # fmt: skip
    """Cuts records (in file order) into chunks: (start, stop, records, the earlier chunk at that place or None).

    Where an earlier run committed a chunk, the records it covered are gathered again so that the
    caller can compare their hash; new chunks never reach into an earlier chunk's start. Copied records cost nothing.
    """
    buf: list[Record] = []
    start = residues = 0
    reuse: Chunk | None = None
    for record in records:
        index = record.position - 1
        if reuse is None and index in earlier:
            if buf:
                yield start, index, buf, None
            buf, start, residues, reuse = [], index, 0, earlier[index]
        if not buf:
            start = index
        buf.append(record)
        residues += 0 if copied and copied(record) else computed_residues(len(record.sequence), embed)
        if reuse is not None:
            if index + 1 == reuse.stop:
                yield start, index + 1, buf, reuse
                buf, residues, reuse = [], 0, None
        elif limit.full(len(buf), residues):
            yield start, index + 1, buf, None
            buf, residues = [], 0
    if buf:  # an earlier chunk that now runs past the input's end is not reused
        yield start, buf[-1].position, buf, None
