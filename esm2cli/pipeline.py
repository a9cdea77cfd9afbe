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
from typing import Protocol

import numpy as np

from esm2cli import __version__, storage
from esm2cli.batching import plan_batches, windows
from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig, ShardConfig
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
from esm2cli.writer import BackgroundWriter, ChunkStore, Rows, build_schema, read_metadata

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (sequences, residues) just finished


class RowSink(Protocol):
    def write(self, index: int, rows: Rows) -> None: ...


@dataclass
class EmbedSummary:
    """What a run did, for the closing line."""

    sequences: int = 0
    residues: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    deduplicated: int = 0
    resumed: int = 0
    already_complete: bool = False
    oom_splits: int = 0
    seconds: float = 0.0
    devices: list[str] = field(default_factory=list)

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
    done: set[int] = frozenset(),
) -> EmbedSummary:
    """Embeds valid records and writes them in input order.

    Records are read ``batch.window`` at a time; identical sequences in a window are embedded
    once; the distinct ones are sorted by length inside the window, cut into batches by token
    budget and submitted; results are put back in input order by row index.

    Args:
        records: Valid records, in file order.
        engine: A started engine.
        writer: Where each window's rows go, with the window's index, in input order.
        batch: Batch size, token budget and window.
        truncate: Residues kept per sequence.
        progress: Called with (sequences, residues) as each batch completes.
        done: Indexes of windows finished by an earlier run: skipped, not computed.

    Returns:
        Counts for the summary line (seconds and devices are filled by the caller).

    Raises:
        Exception: The first error a batch raised; later batches are not waited for.
    """
    summary = EmbedSummary()
    pending: deque[tuple[int, _Window, list[int], Future]] = deque()

    def settle(block: bool) -> None:
        while pending and (block or pending[0][3].done()):
            index, window, uniques, future = pending.popleft()
            window.fill(uniques, future.result())
            rows = sum(len(window.owners[u]) for u in uniques)
            residues = sum(len(window.unique[u]) * len(window.owners[u]) for u in uniques)
            summary.sequences += rows
            summary.residues += residues
            if progress:
                progress(rows, residues)
            if window.missing == 0:  # batches settle in submission order, so windows finish in order
                writer.write(index, window.rows(truncate))

    for index, records_window in enumerate(windows(records, batch.window)):
        if index in done:
            summary.resumed += len(records_window)
            if progress:
                progress(len(records_window), 0)
            continue
        window = _Window.of(records_window, truncate)
        summary.truncated += sum(len(r.sequence) > truncate for r in records_window)
        summary.deduplicated += len(records_window) - len(window.unique)
        for uniques in plan_batches([len(s) for s in window.unique], batch.max_tokens, batch.batch_size):
            pending.append((index, window, uniques, engine.submit([window.unique[u] for u in uniques])))
            settle(block=False)
    settle(block=True)
    return summary


@contextmanager
def readable_source(fasta: str | os.PathLike) -> Iterator[str]:
    """Yields a path or URL that can be read twice: stdin ('-') is spooled to a temporary file first."""
    if str(fasta) != "-":
        yield str(fasta)
        return
    spooled = spool_stdin()
    try:
        yield str(spooled)
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


def run_key(
    fasta: str, model: ModelConfig, embed: EmbedConfig, batch: BatchConfig, inputs: InputConfig, shard: ShardConfig
) -> dict:
    """The arguments that decide a run's output: a rerun with the same key may resume or skip it."""
    return {
        "input": str(fasta), "model": model.model, "load_format": model.load_format, "dtype": model.dtype,
        "layers": list(embed.layers), "pooling": embed.pooling, "per_token": embed.per_token,
        "truncate": embed.truncate, "skip_invalid": inputs.skip_invalid, "window": batch.window,
        "shard": [shard.index, shard.count],
    }  # fmt: skip


def run_metadata(model: ModelConfig, embed: EmbedConfig, setup: EngineSetup, key: dict) -> dict:
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
        "run": key,
    }


def output_target(output: str | os.PathLike, shard: ShardConfig | None) -> str:
    """The file this run writes: ``output`` itself, or ``<output>/part-<i>-of-<n>.parquet`` for a shard."""
    return storage.join(output, shard.part_name()) if shard else str(output)


def _check_existing(target: str, key: dict, overwrite: bool) -> bool:
    """True when the target already holds this very run's output; clears it with overwrite.

    Raises:
        OutputExistsError: Something else is there and overwrite is False.
    """
    if not storage.exists(target):
        return False
    if overwrite:
        storage.remove(target)
        return False
    if read_metadata(target).get("run") == key:
        return True
    raise OutputExistsError(f"{target} already exists (use --overwrite to replace it)")


def embed_fasta(
    fasta: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: ModelConfig,
    embed: EmbedConfig,
    batch: BatchConfig,
    inputs: InputConfig,
    shard: ShardConfig | None = None,
    overwrite: bool = False,
    progress_factory: Callable[[int], ProgressFn] | None = None,
) -> EmbedSummary:
    """Embeds the records of a FASTA file (or of one shard of it) into one Parquet file.

    The work is resumable: each window of records is committed as a chunk of its own, and a
    rerun with the same arguments skips the finished chunks; the chunks are merged into the
    output at the end. An output that this same run already completed is left as it is.

    Args:
        fasta: A path, an fsspec URL (s3://...), or '-' for stdin.
        output: The Parquet file; or, with ``shard``, the directory or prefix of the parts.
        model, embed, batch, inputs: The run's configuration.
        shard: Embed only this shard's contiguous slice of the records, into its part file.
        overwrite: Replace an existing output (and discard unfinished work of another run).
        progress_factory: Given the number of sequences to embed, returns the per-batch callback.

    Returns:
        The run's summary.

    Raises:
        FastaError: The input is unreadable or holds records that cannot be embedded.
        ModelLoadError, DeviceError, ConfigError: The model or devices are unusable.
        OutputExistsError: The output exists (from another run) and overwrite is False.
        OutputError, StorageError: The output cannot be written.
        EngineError: A replica failed.
    """
    shard_cfg = shard or ShardConfig()
    key = run_key(str(fasta), model, embed, batch, inputs, shard_cfg)
    target = output_target(output, shard)
    if _check_existing(target, key, overwrite):
        log.info("%s is already complete: nothing to do", target)
        return EmbedSummary(already_complete=True)
    with readable_source(fasta) as source:
        scan = scan_fasta(source, embed.truncate)
        check_scan(scan, str(fasta), inputs)
        start_pos, stop_pos = shard_cfg.range(scan.records)
        invalid = [rec for rec in scan.invalid if start_pos < rec.position <= stop_pos]
        todo = (stop_pos - start_pos) - len(invalid)
        if shard:
            log.info("shard %d of %d: records %d..%d (%d to embed)", shard.index, shard.count, start_pos + 1,
                     stop_pos, todo)  # fmt: skip
        if invalid:
            log.warning("skipping %d invalid record(s):\n%s", len(invalid), describe_invalid(invalid))
        if scan.too_long:
            log.warning("sequences longer than %d residues are truncated (column 'truncated')", embed.truncate)
        setup = build_engine(model, embed)
        batch = batch.for_devices(on_cuda=any(d.is_cuda for d in setup.devices))
        loaded = setup.model
        schema = build_schema(loaded.hidden_size, setup.layers, embed.per_token, run_metadata(model, embed, setup, key))
        # The chunks also record what the input held, so that an edited input is never resumed into.
        fingerprint = {**key, "input_records": scan.records, "input_residues": scan.residues}
        chunks = ChunkStore(target, schema, loaded.hidden_size, setup.layers, fingerprint)
        done = chunks.open(overwrite)
        if done:
            log.info("resuming: %d finished chunk(s) of %d records each are kept", len(done), batch.window)
        writer = BackgroundWriter(chunks)
        progress = progress_factory(todo) if progress_factory else None
        start = time.perf_counter()
        try:
            with setup.engine as engine:
                mine = (r for r in read_records(source) if start_pos < r.position <= stop_pos and r.problem is None)
                summary = embed_records(mine, engine, writer, batch, embed.truncate, progress, done)
                summary.oom_splits = engine.oom_splits()
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        chunks.commit(-(-todo // batch.window), todo)
    summary.seconds = time.perf_counter() - start
    summary.skipped = [rec.id or f"#{rec.position}" for rec in invalid]
    summary.devices = [d.name for d in setup.devices]
    return summary
