"""Chunks of work: records cut into chunks (by count, compute and bytes), and what one chunk computes
(identical sequences once, long proteins as windows) and gives back as rows, in input order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from esm2cli.config import (
    FIRST_CHUNK_RESIDUES,
    BatchConfig,
    EmbedConfig,
)
from esm2cli.io.chunks import Chunk
from esm2cli.io.records import Record
from esm2cli.io.schema import Embeddings, Rows
from esm2cli.jobs.reuse import ReusedRows, row_hashes
from esm2cli.runtime.windows import (
    WindowSums,
    computed_residues,
    stitch_pooled,
    window_starts,
)


@dataclass
class Deduplicated:
    """The items of a chunk's rows, each distinct sequence once.

    Each record becomes one item (its sequence, truncated) or, for a long protein in window mode, one item per
    window. ``items`` holds each distinct sequence, ``parts[row]`` the items a row is made of, ``starts[row]``
    where its windows start (None for a record that is one item), ``uses[item]`` the (row, start) of each use
    of a window item, and ``owners[item]`` the rows using it (once per use).
    """

    items: list[str]
    parts: list[list[int]]
    starts: list[list[int] | None]
    uses: dict[int, list[tuple[int, int]]]
    owners: list[list[int]]

    @classmethod
    def of(cls, records: list[Record], embed: EmbedConfig) -> Deduplicated:
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
        owners: list[list[int]] = [[] for _ in index]
        for row, ids in enumerate(parts):
            for i in ids:
                owners[i].append(row)
        return cls(list(index), parts, starts, uses, owners)


@dataclass
class WindowStitcher:
    """The windows of long proteins: their per-token vectors summed into their protein's as they come back,
    then each protein's vectors (pooled, and per token if kept) once its last window is in."""

    embed: EmbedConfig
    lengths: list[int]  # residues a row
    starts: list[list[int] | None]  # a windowed row's window starts (None: a row of one item)
    sums: dict[int, WindowSums] = field(default_factory=dict)  # windowed row -> its sums, until complete
    stitched: dict[int, dict] = field(default_factory=dict)  # windowed row -> {layer: (pooled, tokens or None)}

    def add(self, layer: int, uses: list[tuple[int, int]], array: np.ndarray) -> None:
        """One window item's per-token vectors, added at once to the sums of every row that uses it."""
        for row, begin in uses:
            if row not in self.sums:
                self.sums[row] = WindowSums(self.lengths[row], self.starts[row] or [0])
            self.sums[row].add(layer, begin, array)

    def holds(self, row: int) -> bool:
        return row in self.sums

    def stitch(self, row: int, ids: list[int], pooled: dict[int, np.ndarray]) -> None:
        """A windowed row is complete: its pooled vector (and per-token vectors, if kept) from its sums."""
        sums = self.sums.pop(row)
        self.stitched[row] = {
            layer: (
                stitch_pooled(self.embed.pooling, tokens := sums.tokens(layer), [matrix[i] for i in ids]),
                tokens if self.embed.per_token else None,
            )
            for layer, matrix in pooled.items()
        }  # fmt: skip


def assemble_rows(records: list[Record], embed: EmbedConfig, plan: Deduplicated, results: ChunkResults) -> Rows:
    """The rows of a chunk, in input order, from its items' results and its stitched windows."""
    pooled = {layer: np.empty((len(records), m.shape[1]), np.float32) for layer, m in results.pooled.items()}
    per_token: dict[int, list] = {layer: [] for layer in results.pooled} if embed.per_token else {}
    for row, (ids, begins) in enumerate(zip(plan.parts, plan.starts, strict=True)):
        for layer, matrix in results.pooled.items():
            if begins is None:
                pooled[layer][row] = matrix[ids[0]]
                if embed.per_token:
                    per_token[layer].append(results.tokens[layer][ids[0]])
                continue
            pooled[layer][row], stitched = results.windows.stitched[row][layer]
            if embed.per_token:
                per_token[layer].append(stitched)
    return Rows(
        ids=[r.id for r in records],
        descriptions=[r.description for r in records],
        lengths=[len(r.sequence) for r in records],
        truncated=truncated_flags(records, plan, embed),
        pooled=pooled,
        per_token=per_token,
        windows=[len(ids) for ids in plan.parts],
        contacts=[results.contacts[ids[0]] for ids in plan.parts] if embed.contacts else None,
        sequence_sha256=row_hashes(records, embed),
    )


def truncated_flags(records: list[Record], plan: Deduplicated, embed: EmbedConfig) -> list[bool]:
    """Per row: truncated (longer than the window, and not embedded in windows)."""
    return [s is None and len(r.sequence) > embed.truncate for r, s in zip(records, plan.starts, strict=True)]


@dataclass
class ChunkResults:
    """What came back for a chunk's items so far."""

    windows: WindowStitcher
    pooled: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (items, hidden)
    tokens: dict[int, list] = field(default_factory=dict)  # per-token vectors of items that are a whole row
    contacts: dict[int, np.ndarray] = field(default_factory=dict)  # item -> contact map, with --contacts


@dataclass
class ChunkWork:
    """The valid records of one chunk, embedded together; written once every item is back.

    Its parts: the distinct items (``plan``, see Deduplicated), the windows of long proteins stitched back
    (WindowStitcher), and the rows assembled in input order (assemble_rows).
    """

    chunk: Chunk
    records: list[Record]
    embed: EmbedConfig
    plan: Deduplicated
    results: ChunkResults
    missing: int = 0
    row_missing: list[int] = field(default_factory=list)  # row -> its distinct items not back yet
    reused: ReusedRows | None = None  # the chunk's rows copied from earlier outputs (--reuse); records are the rest

    @classmethod
    def of(cls, chunk: Chunk, records: list[Record], embed: EmbedConfig) -> ChunkWork:
        plan = Deduplicated.of(records, embed)
        results = ChunkResults(WindowStitcher(embed, [len(r.sequence) for r in records], plan.starts))
        row_missing = [len(set(ids)) for ids in plan.parts]
        return cls(chunk, records, embed, plan, results, missing=len(plan.items), row_missing=row_missing)

    @property
    def items(self) -> list[str]:
        return self.plan.items

    @property
    def parts(self) -> list[list[int]]:
        return self.plan.parts

    @cached_property
    def windowed(self) -> set[int]:
        """The items that are windows of a long protein."""
        return set(self.plan.uses)

    def truncated_flags(self) -> list[bool]:
        """Per row: truncated (longer than the window, and not embedded in windows)."""
        return truncated_flags(self.records, self.plan, self.embed)

    @property
    def windowed_records(self) -> int:
        return sum(s is not None for s in self.plan.starts)

    def fill(self, items: list[int], result: Embeddings) -> tuple[int, int]:
        """Stores a batch's results; returns (rows now complete, residues embedded for rows)."""
        plan, results = self.plan, self.results
        for layer, matrix in result.pooled.items():
            if layer not in results.pooled:
                results.pooled[layer] = np.empty((len(plan.items), matrix.shape[1]), dtype=np.float32)
            results.pooled[layer][items] = matrix
        for layer, arrays in result.per_token.items():
            slots = results.tokens.setdefault(layer, [None] * len(plan.items))
            for i, array in zip(items, arrays, strict=True):
                windows = plan.uses.get(i, [])
                if self.embed.per_token and len(windows) < len(plan.owners[i]):  # also a whole row of its own
                    slots[i] = array
                results.windows.add(layer, windows, array)  # windows go into their protein's sums, never kept
        results.contacts.update(zip(items, result.contacts, strict=False))
        self.missing -= len(items)
        return self._complete(items)

    def _complete(self, items: list[int]) -> tuple[int, int]:
        """Counts the rows these items complete, and stitches the windowed ones."""
        done = residues = 0
        for i in items:
            residues += len(self.plan.items[i]) * len(self.plan.owners[i])
            for row in set(self.plan.owners[i]):
                self.row_missing[row] -= 1
                done += self.row_missing[row] == 0
                if self.row_missing[row] == 0 and self.results.windows.holds(row):
                    self.results.windows.stitch(row, self.plan.parts[row], self.results.pooled)
        return done, residues

    def rows(self) -> Rows:
        rows = assemble_rows(self.records, self.embed, self.plan, self.results)
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
