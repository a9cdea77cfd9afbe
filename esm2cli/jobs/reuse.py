"""``--reuse`` in the embed pipeline: a chunk's records split into rows copied from earlier outputs and rows computed.

The copied rows take their vectors from the earlier file and everything else (id, description, length,
truncated, windows) from the new record, so the chunk is the one a fresh run would write, bit for bit
in float32, and is committed as any other (resume, shards and merge see no difference).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from esm2cli.config import EmbedConfig
from esm2cli.io.records import Record
from esm2cli.io.reuse import ReuseIndex, Wanted, embedded_sequence, expand_sources, fingerprints
from esm2cli.io.reuse import sequence_sha256 as _sha256
from esm2cli.io.schema import Embeddings, Rows
from esm2cli.runtime.windows import window_starts

log = logging.getLogger(__name__)


def row_hashes(records: Sequence[Record], embed: EmbedConfig) -> list[str]:
    """The ``sequence_sha256`` of each record's row: its residues as embedded."""
    return [_sha256(embedded_sequence(r.sequence, embed)) for r in records]


def row_shape(record: Record, embed: EmbedConfig) -> tuple[bool, int]:
    """(truncated, windows) of a record's row, as the pipeline computes them."""
    long = len(record.sequence) > embed.truncate
    if embed.long_sequences == "window" and long:
        return False, len(window_starts(len(record.sequence), embed.truncate, embed.window_overlap))
    return long, 1


@dataclass
class ReusedRows:
    """A chunk's rows copied from earlier outputs: where they stand among the chunk's records, and what they hold."""

    positions: list[int]
    rows: Rows
    total: int  # the chunk's rows, copied and computed

    def count_into(self, summary, progress) -> None:
        """Adds these rows to a run's EmbedSummary (reused, truncated, windowed) and to its progress."""
        summary.reused += len(self.positions)
        summary.truncated += sum(self.rows.truncated)
        summary.windowed += sum(w > 1 for w in self.rows.windows or [])
        if progress:
            progress(len(self.positions), 0)

    def merge(self, computed: Rows) -> Rows:
        """The chunk's rows in input order: the copied ones at their positions, the computed ones between them."""
        mine = set(self.positions)
        theirs = [i for i in range(self.total) if i not in mine]
        if len(theirs) != len(computed):
            raise AssertionError(f"{len(computed)} computed rows for {len(theirs)} places; this is a bug")
        parts = [(self.positions, self.rows), (theirs, computed)]

        def column(name: str) -> list:
            out: list = [None] * self.total
            for places, rows in parts:
                values = getattr(rows, name)
                for place, value in zip(places, values or [], strict=False):
                    out[place] = value
            return out

        pooled = {}
        for layer, matrix in self.rows.pooled.items():
            pooled[layer] = np.empty((self.total, matrix.shape[1]), np.float32)
            for places, rows in parts:
                if places:
                    pooled[layer][places] = rows.pooled[layer]
        per_token: dict[int, list] = {}
        for layer in self.rows.per_token:
            per_token[layer] = [None] * self.total
            for places, rows in parts:
                for place, array in zip(places, rows.per_token.get(layer, []), strict=False):
                    per_token[layer][place] = array
        return Rows(
            ids=column("ids"),
            descriptions=column("descriptions"),
            lengths=column("lengths"),
            truncated=column("truncated"),
            pooled=pooled,
            per_token=per_token,
            windows=column("windows"),
            contacts=column("contacts") if self.rows.contacts is not None else None,
            sequence_sha256=column("sequence_sha256"),
        )


# A copied row must be this close to the row computed now (relative L2): float16 storage and another device
# or kernel move a row by well under 1%; the vectors of two different proteins are far further apart.
CHECK_TOLERANCE = 0.02


def _relative_distance(stored: np.ndarray, fresh: np.ndarray) -> float:
    scale = float(np.linalg.norm(fresh)) or 1.0
    return float(np.linalg.norm(stored.astype(np.float64) - fresh)) / scale


def done_future(result) -> Future:
    """A future that already holds its result (a chunk with nothing to compute, queued behind those computing)."""
    future: Future = Future()
    future.set_result(result)
    return future


class ChunkReuse:
    """Finds, for each chunk, the records whose rows earlier outputs already hold, and reads those rows.

    Before the first row of a file is copied, that row is computed afresh and compared (``check_with``): a file
    whose sequence_sha256 column is out of step with its vectors (rows sorted or edited after esm2cli wrote
    it) is then not reused at all. One row a file is checked, so an edit of a few rows among many goes unseen.
    """

    def __init__(self, index: ReuseIndex, embed: EmbedConfig):
        self.index = index
        self.embed = embed
        self._probe: Callable[[Record], Callable[[], Rows]] | None = None
        self._checked: set[str] = set()

    def check_with(self, probe: Callable[[Record], Callable[[], Rows]]) -> None:
        """Checks each file's first copied row against ``probe`` (a record submitted as the pipeline computes it,
        windows stitched: a call waits for its row)."""
        self._probe = probe

    def holds(self, record: Record) -> bool:
        """True when an earlier output holds this record's row, from a file already checked: chunks are sized by
        the work they hold, and a file that fails its check has its rows computed after all."""
        loc = self.index.place(_sha256(embedded_sequence(record.sequence, self.embed)))
        return loc >= 0 and (self._probe is None or self.index.file_of(loc) in self._checked)

    def split(self, records: list[Record]) -> tuple[list[Record], ReusedRows | None]:
        """(the records to compute, the rows copied for the others), for one chunk's valid records."""
        hashes = row_hashes(records, self.embed)
        locs = self._checked_locs(records, hashes)
        hits = [i for i, loc in enumerate(locs) if loc >= 0]
        if not hits:
            return records, None
        found = [hashes[i] for i in hits]
        vectors = self.index.read(locs[hits], found)
        rest = [r for i, r in enumerate(records) if locs[i] < 0]
        return rest, ReusedRows(hits, self._rows([records[i] for i in hits], found, vectors), len(records))

    def _checked_locs(self, records: list[Record], hashes: list[str]) -> np.ndarray:
        """lookup's places of the records' rows, once each file they come from has passed its check."""
        locs = self.index.lookup(hashes)
        while self._probe is not None and (probes := self._probes(locs)):
            # submitted together, so that the replicas share them (a part folder's files come up in one chunk)
            fresh = [(path, i, self._probe(records[i])) for path, i in probes.items()]
            for path, i, row in fresh:
                self._checked.add(path)
                difference = self._difference(hashes[i], locs[i], row())
                if difference > CHECK_TOLERANCE:
                    log.warning(
                        "not reused: %s: its row of %s is %.0f%% away from that sequence computed now: its vectors "
                        "are out of step with its sequence_sha256 column (rows edited or reordered after esm2cli "
                        "wrote it?)",
                        path, records[i].id, 100 * difference,
                    )  # fmt: skip
                    self.index.reject(locs[i])
            locs = self.index.lookup(hashes)
        return locs

    def _probes(self, locs: np.ndarray) -> dict[str, int]:
        """Each file not yet checked, with its first row among the chunk's hits."""
        first: dict[str, int] = {}
        for i in np.nonzero(locs >= 0)[0]:
            path = self.index.file_of(locs[i])
            if path not in self._checked and path not in first:
                first[path] = int(i)
        return first

    def _difference(self, digest: str, loc: int, fresh: Rows) -> float:
        """The largest relative L2 distance, over the layers, between the stored row and the row computed now."""
        stored = self.index.read(np.array([loc]), [digest], count=False).pooled
        return max(_relative_distance(stored[layer][0], fresh.pooled[layer][0]) for layer in fresh.pooled)

    def _rows(self, records: list[Record], hashes: list[str], vectors: Embeddings) -> Rows:
        shapes = [row_shape(r, self.embed) for r in records]
        return Rows(
            ids=[r.id for r in records],
            descriptions=[r.description for r in records],
            lengths=[len(r.sequence) for r in records],
            truncated=[t for t, _ in shapes],
            pooled=vectors.pooled,
            per_token=vectors.per_token if self.embed.per_token else {},
            windows=[w for _, w in shapes],
            contacts=vectors.contacts if self.embed.contacts else None,
            sequence_sha256=hashes,
        )

    @property
    def counts(self) -> dict[str, int]:
        """Rows copied so far, by file."""
        return {path: n for path, n in self.index.counts.items() if n}

    def close(self) -> None:
        self.index.close()


def reuse_stamps(paths: Sequence[str]) -> tuple[list[str], list[dict]]:
    """The files ``--reuse`` names, and their fingerprints (recorded with the run's chunks: a change is detected).

    Raises:
        ConfigError: A path names no file, nor a directory or prefix holding outputs.
    """
    files = expand_sources(paths)
    return files, fingerprints(files)


def open_reuse(files: list[str], identity: dict, embed: EmbedConfig, layers: Sequence[int],
               hidden: int) -> ChunkReuse | None:  # fmt: skip
    """Indexes the rows of the earlier outputs that fit this run; None when none fits."""
    wanted = Wanted(tuple(layers), hidden, embed.per_token, embed.contacts)
    index = ReuseIndex(files, identity, wanted)
    if not index.sources:
        index.close()
        log.warning("--reuse: no earlier output fits this run: every row is computed")
        return None
    log.info("--reuse: %d distinct sequences in %d earlier output(s)", len(index), len(index.sources))
    return ChunkReuse(index, embed)
