"""The embed job as a library: FASTA -> checks -> sorted batches -> Engine -> Parquet, in input order."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from esm2cli import __version__
from esm2cli.batching import plan_batches, windows
from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig
from esm2cli.engine import Engine, EngineSetup, build_engine
from esm2cli.errors import FastaError, OutputExistsError
from esm2cli.fasta import (
    FastaScan,
    Record,
    describe_duplicates,
    describe_invalid,
    read_records,
    scan_fasta,
    spool_stdin,
)
from esm2cli.model import BatchEmbeddings
from esm2cli.writer import BackgroundWriter, EmbeddingWriter, Rows, build_schema

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (sequences, residues) just finished


class RowSink(Protocol):
    def write(self, rows: Rows) -> None: ...


@dataclass
class EmbedSummary:
    """What a run did, for the closing line."""

    sequences: int = 0
    residues: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    deduplicated: int = 0
    oom_splits: int = 0
    seconds: float = 0.0
    devices: list[str] = field(default_factory=list)
    batches_per_device: dict[str, int] = field(default_factory=dict)

    @property
    def residues_per_s(self) -> float:
        return self.residues / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Window:
    """A run of consecutive records embedded together; written once every batch is back.

    Identical (truncated) sequences are embedded once: ``unique`` holds each distinct sequence
    and ``owners`` the window rows that take its result.
    """

    records: list[Record]
    unique: list[str]
    owners: list[list[int]]
    pooled: dict[int, np.ndarray] = field(default_factory=dict)
    per_token: dict[int, list] = field(default_factory=dict)
    missing: int = 0

    @classmethod
    def of(cls, records: list[Record], truncate: int) -> _Window:
        first: dict[str, int] = {}
        owners: list[list[int]] = []
        for row, record in enumerate(records):
            seq = record.sequence[:truncate]
            if seq not in first:
                first[seq] = len(owners)
                owners.append([])
            owners[first[seq]].append(row)
        return cls(records, list(first), owners, missing=len(owners))

    def fill(self, uniques: list[int], result: BatchEmbeddings) -> None:
        for layer, matrix in result.pooled.items():
            if layer not in self.pooled:
                self.pooled[layer] = np.empty((len(self.records), matrix.shape[1]), dtype=np.float32)
            for k, u in enumerate(uniques):
                self.pooled[layer][self.owners[u]] = matrix[k]
        for layer, arrays in result.per_token.items():
            slots = self.per_token.setdefault(layer, [None] * len(self.records))
            for u, array in zip(uniques, arrays, strict=True):
                for row in self.owners[u]:
                    slots[row] = array
        self.missing -= len(uniques)

    def rows(self, truncate: int) -> Rows:
        recs = self.records
        return Rows(
            ids=[r.id for r in recs],
            descriptions=[r.description for r in recs],
            lengths=[len(r.sequence) for r in recs],
            truncated=[len(r.sequence) > truncate for r in recs],
            pooled=self.pooled,
            per_token=self.per_token,
        )


def embed_records(
    records: Iterable[Record],
    engine: Engine,
    writer: RowSink,
    batch: BatchConfig,
    truncate: int,
    progress: ProgressFn | None = None,
) -> EmbedSummary:
    """Embeds valid records and writes them in input order.

    Records are read ``batch.window`` at a time; identical sequences in a window are embedded
    once; the distinct ones are sorted by length inside the window, cut into batches by token
    budget and submitted; results are put back in input order by row index.

    Args:
        records: Valid records, in file order.
        engine: A started engine.
        writer: Where rows go, in input order.
        batch: Batch size, token budget and window.
        truncate: Residues kept per sequence.
        progress: Called with (sequences, residues) as each batch completes.

    Returns:
        Counts for the summary line (seconds and devices are filled by the caller).

    Raises:
        Exception: The first error a batch raised; later batches are not waited for.
    """
    summary = EmbedSummary()
    pending: deque[tuple[_Window, list[int], Future]] = deque()

    def settle(block: bool) -> None:
        while pending and (block or pending[0][2].done()):
            window, uniques, future = pending.popleft()
            window.fill(uniques, future.result())
            rows = sum(len(window.owners[u]) for u in uniques)
            residues = sum(len(window.unique[u]) * len(window.owners[u]) for u in uniques)
            summary.sequences += rows
            summary.residues += residues
            if progress:
                progress(rows, residues)
            if window.missing == 0:  # batches settle in submission order, so windows finish in order
                writer.write(window.rows(truncate))

    for records_window in windows(records, batch.window):
        window = _Window.of(records_window, truncate)
        summary.truncated += sum(len(r.sequence) > truncate for r in records_window)
        summary.deduplicated += len(records_window) - len(window.unique)
        for uniques in plan_batches([len(s) for s in window.unique], batch.max_tokens, batch.batch_size):
            pending.append((window, uniques, engine.submit([window.unique[u] for u in uniques])))
            settle(block=False)
    settle(block=True)
    return summary


@contextmanager
def readable_source(fasta: str | os.PathLike) -> Iterator[Path]:
    """Yields a path that can be read twice: stdin ('-') is spooled to a temporary file first."""
    if str(fasta) != "-":
        yield Path(fasta)
        return
    spooled = spool_stdin()
    try:
        yield spooled
    finally:
        spooled.unlink(missing_ok=True)


def check_scan(scan: FastaScan, fasta: str, inputs: InputConfig) -> None:
    """Stops the run before any compute when the input holds records it cannot embed.

    Raises:
        FastaError: Invalid records (without skip_invalid), duplicate ids (without
            allow_duplicate_ids), or nothing left to embed. The message names the records.
    """
    if scan.invalid and not inputs.skip_invalid:
        raise FastaError(
            f"{fasta}: {len(scan.invalid)} of {scan.records} records cannot be embedded "
            f"(use --skip-invalid to embed the others):\n{describe_invalid(scan.invalid)}"
        )
    if scan.duplicate_ids and not inputs.allow_duplicate_ids:
        raise FastaError(
            f"{fasta}: {len(scan.duplicate_ids)} id(s) occur more than once "
            f"(use --allow-duplicate-ids to keep them all):\n{describe_duplicates(scan.duplicate_ids)}"
        )
    if scan.valid == 0:
        raise FastaError(f"{fasta}: no records to embed" + (" (every record is invalid)" if scan.records else ""))


def run_metadata(model: ModelConfig, embed: EmbedConfig, setup: EngineSetup) -> dict:
    """What the output file records about how it was made."""
    return {
        "model": model.model,
        "model_source": setup.model.source,
        "random_weights": setup.model.dummy,
        "layers": list(setup.layers),
        "pooling": embed.pooling,
        "dtype": setup.dtype,
        "truncate": embed.truncate,
        "esm2cli_version": __version__,
    }


def embed_fasta(
    fasta: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: ModelConfig,
    embed: EmbedConfig,
    batch: BatchConfig,
    inputs: InputConfig,
    overwrite: bool = False,
    progress_factory: Callable[[FastaScan], ProgressFn] | None = None,
) -> EmbedSummary:
    """Embeds every record of a FASTA file into one Parquet file.

    Args:
        fasta: A path, or '-' for stdin.
        output: The Parquet file; written to ``<output>.tmp`` and renamed on success.
        model, embed, batch, inputs: The run's configuration.
        overwrite: Replace an existing output file.
        progress_factory: Given the input scan, returns the per-batch progress callback.

    Returns:
        The run's summary.

    Raises:
        FastaError: The input is unreadable or holds records that cannot be embedded.
        ModelLoadError, DeviceError, ConfigError: The model or devices are unusable.
        OutputExistsError: The output exists and overwrite is False.
        OutputError: The output cannot be written.
        EngineError: A replica failed.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists (use --overwrite to replace it)")
    with readable_source(fasta) as source:
        scan = scan_fasta(source, embed.truncate)
        check_scan(scan, str(fasta), inputs)
        skipped = [rec.id or f"#{rec.position}" for rec in scan.invalid]
        if skipped:
            log.warning("skipping %d invalid record(s):\n%s", len(skipped), describe_invalid(scan.invalid))
        if scan.too_long:
            log.warning(
                "%d sequence(s) longer than %d residues will be truncated (column 'truncated')",
                scan.too_long,
                embed.truncate,
            )
        setup = build_engine(model, embed)
        batch = batch.for_devices(on_cuda=any(d.is_cuda for d in setup.devices))
        loaded, layers = setup.model, setup.layers
        metadata = run_metadata(model, embed, setup)
        schema = build_schema(loaded.hidden_size, layers, embed.per_token, metadata)
        writer = BackgroundWriter(EmbeddingWriter(output, schema, loaded.hidden_size, layers))
        progress = progress_factory(scan) if progress_factory else None
        start = time.perf_counter()
        try:
            with setup.engine as engine:
                valid = (rec for rec in read_records(source) if rec.problem is None)
                summary = embed_records(valid, engine, writer, batch, embed.truncate, progress)
                summary.batches_per_device = engine.batches_done()
                summary.oom_splits = engine.oom_splits()
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    summary.seconds = time.perf_counter() - start
    summary.skipped = skipped
    summary.devices = [d.name for d in setup.devices]
    return summary
