"""The embed job as a library: FASTA -> checks -> sorted batches -> Engine -> Parquet, in input order."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from esm2cli import __version__, storage
from esm2cli.batching import plan_batches
from esm2cli.config import FIRST_CHUNK_RESIDUES, BatchConfig, EmbedConfig, InputConfig, ModelConfig, ShardConfig
from esm2cli.engine import Engine, EngineSetup, build_engine
from esm2cli.errors import ConfigError, FastaError, Interrupted, OutputExistsError
from esm2cli.fasta import (
    FastaScan,
    Record,
    describe_duplicates,
    describe_invalid,
    read_records,
    scan_fasta,
    spool_stdin,
)
from esm2cli.identity import describe_changes, hash_records, model_identity, same_file
from esm2cli.lock import OutputLock
from esm2cli.model import BatchEmbeddings
from esm2cli.writer import BackgroundWriter, Chunk, ChunkStore, Rows, build_schema, read_metadata

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (sequences, residues) just finished


class ChunkSink(Protocol):
    def write(self, chunk: Chunk, rows: Rows) -> None: ...

    def discard(self, chunk: Chunk) -> None: ...


@dataclass
class EmbedSummary:
    """What a run did, for the closing line."""

    sequences: int = 0
    residues: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    deduplicated: int = 0
    resumed: int = 0
    recomputed: int = 0
    already_complete: bool = False
    oom_splits: int = 0
    seconds: float = 0.0
    devices: list[str] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def residues_per_s(self) -> float:
        return self.residues / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _ChunkWork:
    """The valid records of one chunk, embedded together; written once every batch is back.

    Identical (truncated) sequences are embedded once: ``unique`` holds each distinct sequence
    and ``owners`` the chunk rows that take its result.
    """

    chunk: Chunk
    records: list[Record]
    unique: list[str]
    owners: list[list[int]]
    pooled: dict[int, np.ndarray] = field(default_factory=dict)
    per_token: dict[int, list] = field(default_factory=dict)
    missing: int = 0

    @classmethod
    def of(cls, chunk: Chunk, records: list[Record], truncate: int) -> _ChunkWork:
        first: dict[str, int] = {}
        owners: list[list[int]] = []
        for row, record in enumerate(records):
            seq = record.sequence[:truncate]
            if seq not in first:
                first[seq] = len(owners)
                owners.append([])
            owners[first[seq]].append(row)
        return cls(chunk, records, list(first), owners, missing=len(owners))

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
    records: Iterable[Record], earlier: dict[int, Chunk], limit: ChunkLimit, truncate: int
) -> Iterator[tuple[int, int, list[Record], Chunk | None]]:
    """Cuts records (in file order) into chunks: (start, stop, records, the earlier chunk at that place or None).

    Where an earlier run committed a chunk, the records it covered are gathered again so that the
    caller can compare their hash; new chunks never reach into an earlier chunk's start.
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
        residues += min(len(record.sequence), truncate)
        if reuse is not None:
            if index + 1 == reuse.stop:
                yield start, index + 1, buf, reuse
                buf, residues, reuse = [], 0, None
        elif limit.full(len(buf), residues):
            yield start, index + 1, buf, None
            buf, residues = [], 0
    if buf:  # an earlier chunk that now runs past the input's end is not reused
        yield start, buf[-1].position, buf, None


def embed_records(
    records: Iterable[Record],
    engine: Engine,
    sink: ChunkSink,
    batch: BatchConfig,
    truncate: int,
    progress: ProgressFn | None = None,
    earlier: dict[int, Chunk] | None = None,
    limit: ChunkLimit | None = None,
) -> EmbedSummary:
    """Embeds records chunk by chunk and hands each chunk's rows, in input order, to the sink.

    Records are cut into chunks (see ChunkLimit); identical sequences in a chunk are embedded
    once; the distinct ones are sorted by length inside the chunk, cut into batches by token
    budget and submitted; results are put back in input order by row index. Invalid records
    (``problem`` set) belong to their chunk but get no row.

    Args:
        records: Records in file order (invalid ones are skipped).
        engine: A started engine.
        sink: Where each chunk's rows go (a ChunkStore, or a BackgroundWriter in front of one).
        batch: Batch size, token budget and chunk bounds.
        truncate: Residues kept per sequence.
        progress: Called with (sequences, residues) as each batch completes.
        earlier: Chunks committed by an earlier run, by start: reused when their records hash the same.
        limit: When to close a chunk (default: from ``batch``).

    Returns:
        Counts for the summary line, and the chunks that make the output, in order (seconds and
        devices are filled by the caller).

    Raises:
        Exception: The first error a batch raised; later batches are not waited for.
    """
    summary = EmbedSummary()
    limit = limit or ChunkLimit(batch)
    pending: deque[tuple[_ChunkWork, list[int], Future]] = deque()
    clock = {"start": None}

    def settle(block: bool) -> None:
        while pending and (block or pending[0][2].done()):
            work, uniques, future = pending.popleft()
            work.fill(uniques, future.result())
            rows = sum(len(work.owners[u]) for u in uniques)
            residues = sum(len(work.unique[u]) * len(work.owners[u]) for u in uniques)
            summary.sequences += rows
            summary.residues += residues
            limit.observe(summary.residues, time.perf_counter() - clock["start"])
            if work.missing == 0:  # batches settle in submission order, so chunks finish in order
                sink.write(work.chunk, work.rows(truncate))
            if progress:
                progress(rows, residues)

    for start, stop, chunk_records, old in split_chunks(records, earlier or {}, limit, truncate):
        chunk = Chunk(start, stop, hash_records(chunk_records))
        valid = [r for r in chunk_records if r.problem is None]
        summary.chunks.append(chunk)
        if old is not None:
            if old == chunk:
                summary.resumed += len(valid)
                if progress:
                    progress(len(valid), 0)
                continue
            summary.recomputed += 1
            sink.discard(old)
        work = _ChunkWork.of(chunk, valid, truncate)
        summary.truncated += sum(len(r.sequence) > truncate for r in valid)
        summary.deduplicated += len(valid) - len(work.unique)
        if not work.unique:
            sink.write(chunk, work.rows(truncate))
            continue
        for uniques in plan_batches([len(s) for s in work.unique], batch.max_tokens, batch.batch_size):
            clock["start"] = clock["start"] or time.perf_counter()
            pending.append((work, uniques, engine.submit([work.unique[u] for u in uniques])))
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


def run_identity(scan: FastaScan, model_identity: str, dtype: str, embed: EmbedConfig, inputs: InputConfig,
                 shard: ShardConfig) -> dict:  # fmt: skip
    """What decides a run's numbers: the input's content, the weights, and every option that changes them.

    Devices, batch sizes and token budgets are left out: they change the numbers only by rounding.
    """
    return {
        "input_sha256": scan.sha256, "input_records": scan.records, "model_identity": model_identity,
        "dtype": dtype, "layers": list(embed.layers), "pooling": embed.pooling, "per_token": embed.per_token,
        "truncate": embed.truncate, "skip_invalid": inputs.skip_invalid, "shard": [shard.index, shard.count],
    }  # fmt: skip


def chunk_options(identity: dict) -> dict:
    """The identity without the input: committed chunks of other options are never reused."""
    return {k: v for k, v in identity.items() if not k.startswith("input_")}


def run_metadata(fasta: str, model: ModelConfig, embed: EmbedConfig, setup: EngineSetup, identity: dict) -> dict:
    """What the output file records about how it was made."""
    return {
        "model": model.model,
        "model_source": setup.model.source,
        "random_weights": setup.model.dummy,
        "layers": list(setup.layers),
        "pooling": embed.pooling,
        "dtype": setup.dtype,
        "truncate": embed.truncate,
        "input": fasta,
        "esm2cli_version": __version__,
        "identity": identity,
    }


def output_target(output: str | os.PathLike, shard: ShardConfig | None) -> str:
    """The file this run writes: ``output`` itself, or ``<output>/part-<i>-of-<n>.parquet`` for a shard."""
    return storage.join(output, shard.part_name()) if shard else str(output)


def check_target(fasta: str, target: str, shard: ShardConfig | None) -> None:
    """Refuses, before anything is touched, an output that is the input or an existing directory.

    Raises:
        ConfigError: The output names the input file, or a directory where a file is expected.
    """
    if fasta != "-" and same_file(fasta, target):
        raise ConfigError(f"{target} is the input file: name another output")
    if not storage.is_url(target) and os.path.isdir(target):
        hint = "" if shard else " (or add --shard-count to write parts into it)"
        raise ConfigError(f"{target} is a directory: name a file{hint}")


def is_complete(target: str, identity: dict, overwrite: bool) -> bool:
    """True when the target already holds this very run's output.

    Raises:
        OutputExistsError: Another output is there and overwrite is False; the message names what differs.
    """
    if not storage.exists(target):
        return False
    metadata = read_metadata(target)
    if metadata.get("identity") == identity:
        return True
    if overwrite:
        return False  # replaced, atomically, once the new output is complete
    if not metadata:
        raise OutputExistsError(f"{target} already exists and is not esm2cli output (add --overwrite to replace it)")
    changes = describe_changes(metadata.get("identity") or {}, identity)
    raise OutputExistsError(
        f"{target} already exists, made by another run ({'; '.join(changes)}): add --overwrite to replace it"
    )


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

    The work is resumable: chunks of records are committed as files of their own (every
    ``batch.chunk_size`` records, or about ``batch.commit_seconds`` of compute), and a rerun reuses
    a chunk only when the records it covers hash the same and the options are the same; the chunks
    are merged into the output at the end, which replaces any earlier output atomically. An output
    that this same run (same input content, weights and options) already completed is left as it is.

    Args:
        fasta: A path, an fsspec URL (s3://...), or '-' for stdin.
        output: The Parquet file; or, with ``shard``, the directory or prefix of the parts.
        model, embed, batch, inputs: The run's configuration.
        shard: Embed only this shard's contiguous slice of the records, into its part file.
        overwrite: Replace an existing output of another run (and discard unfinished work of other options).
        progress_factory: Given the number of sequences to embed, returns the per-batch callback.

    Returns:
        The run's summary.

    Raises:
        FastaError: The input is unreadable or holds records that cannot be embedded.
        ModelLoadError, DeviceError, ConfigError: The model, devices or output are unusable.
        OutputExistsError: The output exists (from another run) and overwrite is False.
        OutputLockedError: Another live run writes the same output.
        OutputError, StorageError: The output cannot be written.
        EngineError: A replica failed.
    """
    from esm2cli.devices import resolve_devices, resolve_dtype
    from esm2cli.model import resolve_source

    shard_cfg = shard or ShardConfig()
    target = output_target(output, shard)
    check_target(str(fasta), target, shard)
    with OutputLock(target), readable_source(fasta) as source:
        scan = scan_fasta(source, embed.truncate)
        check_scan(scan, str(fasta), inputs)
        dtype = resolve_dtype(model.dtype, resolve_devices(model.devices))
        model = replace(model, dtype=dtype)
        weights = model_identity(resolve_source(model.model), model.load_format)
        if weights is not None and is_complete(target, run_identity(scan, weights, dtype, embed, inputs, shard_cfg),
                                               overwrite):  # fmt: skip
            return EmbedSummary(already_complete=True)
        setup = build_engine(model, embed)
        if weights is None:  # a hub model that was not cached before loading
            weights = model_identity(setup.model.source, model.load_format) or f"unresolved:{setup.model.source}"
        identity = run_identity(scan, weights, dtype, embed, inputs, shard_cfg)
        if is_complete(target, identity, overwrite):
            return EmbedSummary(already_complete=True)
        return _embed_into(source, str(fasta), target, scan, setup, identity, model, embed, batch, inputs, shard,
                           overwrite, progress_factory)  # fmt: skip


def _embed_into(source, fasta, target, scan, setup, identity, model, embed, batch, inputs, shard, overwrite,
                progress_factory) -> EmbedSummary:  # fmt: skip
    """The compute of embed_fasta, once the output is known to need it."""
    start_pos, stop_pos = (shard or ShardConfig()).range(scan.records)
    invalid = [rec for rec in scan.invalid if start_pos < rec.position <= stop_pos]
    todo = (stop_pos - start_pos) - len(invalid)
    if shard:
        log.info("shard %d of %d: records %d..%d (%d to embed)", shard.index, shard.count, start_pos + 1, stop_pos,
                 todo)  # fmt: skip
    if invalid:
        log.warning("skipping %d invalid record(s):\n%s", len(invalid), describe_invalid(invalid))
    if scan.too_long:
        log.warning("sequences longer than %d residues are truncated (column 'truncated')", embed.truncate)
    batch = batch.for_devices(on_cuda=any(d.is_cuda for d in setup.devices))
    hidden, layers = setup.model.hidden_size, setup.layers
    schema = build_schema(hidden, layers, embed.per_token, run_metadata(fasta, model, embed, setup, identity))
    chunks = ChunkStore(target, schema, hidden, layers, chunk_options(identity))
    earlier = chunks.open(overwrite)
    if earlier:
        log.info("resuming: %d chunk(s) committed by an earlier run are checked against the input", len(earlier))
    limit = ChunkLimit(batch, 4 * hidden * len(layers) * embed.per_token, 4 * hidden * len(layers))
    writer = BackgroundWriter(chunks)
    progress = progress_factory(todo) if progress_factory else None
    start = time.perf_counter()
    try:
        with setup.engine as engine:
            mine = (r for r in read_records(source) if start_pos < r.position <= stop_pos)
            summary = embed_records(mine, engine, writer, batch, embed.truncate, progress, earlier, limit)
            summary.oom_splits = engine.oom_splits()
        writer.finish()
    except Interrupted:
        _keep_finished(writer)
        raise
    except BaseException:
        writer.abort()
        raise
    if summary.recomputed:
        log.warning("%d chunk(s) of an earlier run no longer match the input: recomputed", summary.recomputed)
    chunks.commit(summary.chunks, todo)
    summary.seconds = time.perf_counter() - start
    summary.skipped = [rec.id or f"#{rec.position}" for rec in invalid]
    summary.devices = [d.name for d in setup.devices]
    return summary


def _keep_finished(writer: BackgroundWriter) -> None:
    """On an interruption, lets the chunks already complete reach the disk (they are the rerun's head start)."""
    try:
        writer.finish()
    except Exception:  # the chunk being written when the signal came is dropped; the rest are safe
        writer.abort()
