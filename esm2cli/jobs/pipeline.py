"""The embed job as a library: FASTA -> checks -> sorted batches -> Engine -> Parquet, in input order."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Protocol

from esm2cli.config import (
    WRITER_DEPTH,
    BatchConfig,
    EmbedConfig,
    InputConfig,
    ModelConfig,
    ShardConfig,
    __version__,
)
from esm2cli.errors import ConfigError, FastaError, InputError, Interrupted, StorageError
from esm2cli.io import hdf5, storage
from esm2cli.io.chunks import Chunk, ChunkStore
from esm2cli.io.fasta import FastaScan, check_scan, describe_invalid, scan_fasta
from esm2cli.io.identity import embed_identity, stamp_weights
from esm2cli.io.lock import OutputLock
from esm2cli.io.parquet import BackgroundWriter
from esm2cli.io.records import Record, chunk_digest, hash_records
from esm2cli.io.schema import Embeddings, Rows, build_schema
from esm2cli.io.split import InputSlice, InputSource, shard_source
from esm2cli.io.targets import check_target, is_complete, output_target
from esm2cli.jobs.chunking import ChunkLimit, ChunkWork, split_chunks
from esm2cli.jobs.reuse import ChunkReuse, done_future, open_reuse, reuse_stamps
from esm2cli.model.invariant import FORWARD_REVISION
from esm2cli.runtime.batching import pack_batches
from esm2cli.runtime.engine import Engine, EngineSetup, build_engine, resolve_placement
from esm2cli.runtime.memory import release_free_memory
from esm2cli.runtime.windows import (
    WINDOW_RULE,
    check_overlap,
    computed_residues,
    overlap_warning,
)

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
    windowed: int = 0
    deduplicated: int = 0
    resumed: int = 0
    recomputed: int = 0
    reused: int = 0  # rows copied from earlier outputs (--reuse)
    reused_from: dict[str, int] = field(default_factory=dict)
    already_complete: bool = False
    oom_splits: int = 0
    seconds: float = 0.0
    devices: list[str] = field(default_factory=list)
    model: str = ""
    dtype: str = ""  # as resolved (never "auto")
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def residues_per_s(self) -> float:
        return self.residues / self.seconds if self.seconds > 0 else 0.0


def embed_records(
    records: Iterable[Record],
    engine: Engine,
    sink: ChunkSink,
    batch: BatchConfig,
    embed: EmbedConfig,
    *,
    progress: ProgressFn | None = None,
    earlier: dict[int, Chunk] | None = None,
    limit: ChunkLimit | None = None,
    digests: array[int] | None = None,
    reuse: ChunkReuse | None = None,
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
        embed: Truncation, window rule and whether per-token vectors are kept.
        progress: Called with (sequences, residues) as each batch completes.
        earlier: Chunks committed by an earlier run, by start: reused when their records hash the same.
        limit: When to close a chunk (default: from ``batch``).
        digests: The records' digests from the check pass (FastaScan.record_digests), which identify the
            chunks; None hashes each chunk's records here (callers without a check pass).
        reuse: Earlier outputs whose rows are copied for the records they hold (--reuse).

    Returns:
        Counts for the summary line, and the chunks that make the output, in order (seconds and
        devices are filled by the caller).

    Raises:
        Exception: The first error a batch raised; later batches are not waited for.
    """
    summary = EmbedSummary()
    limit = limit or ChunkLimit(batch)
    pending: deque[tuple[ChunkWork, list[int], Future]] = deque()
    clock = {"start": 0.0}

    def settle(block: bool) -> None:
        while pending and (block or pending[0][2].done()):
            work, items, future = pending.popleft()
            rows, residues = work.fill(items, future.result())
            summary.sequences += rows
            summary.residues += residues
            limit.observe(summary.residues, time.perf_counter() - clock["start"])
            if work.missing == 0:  # batches settle in submission order, so chunks finish in order
                sink.write(work.chunk, work.rows())
            if progress:
                progress(rows, residues)

    if reuse is not None:
        reuse.check_with(_probe(engine, batch, embed))  # each file's first copied row, computed afresh
    copied = reuse.holds if reuse is not None else None
    for start, stop, chunk_records, old in split_chunks(records, earlier or {}, limit, embed, copied):
        sha = chunk_digest(digests, start, stop) if digests is not None else hash_records(chunk_records)
        chunk = Chunk(start, stop, sha)
        valid = [r for r in chunk_records if r.problem is None]
        summary.chunks.append(chunk)
        if old is not None:
            if old == chunk:
                summary.resumed += len(valid)
                if progress:
                    progress(len(valid), sum(computed_residues(len(r.sequence), embed) for r in valid))
                continue
            summary.recomputed += 1
            sink.discard(old)
        work = _chunk_work(chunk, valid, embed, reuse, summary, progress)
        summary.truncated += sum(work.truncated_flags())
        summary.windowed += work.windowed_records
        summary.deduplicated += sum(len(p) for p in work.parts) - len(work.items)
        if not work.items:
            if pending:  # behind the chunks still computing, so that every sink sees chunks in order
                pending.append((work, [], done_future(Embeddings({}, {}))))
            else:
                sink.write(chunk, work.rows())
            continue
        for items in pack_batches([len(s) for s in work.items], _budget(batch), batch.batch_size):
            clock["start"] = clock["start"] or time.perf_counter()
            pending.append((work, items, _submit(engine, work, items)))
            settle(block=False)
    settle(block=True)
    return summary


def _submit(engine: Engine, work: ChunkWork, items: list[int]) -> Future:
    """Submits a batch of a chunk's items; windows come back per token, to be stitched into their protein's row."""
    sequences = [work.items[i] for i in items]
    if not work.embed.per_token and work.windowed.intersection(items):
        return engine.submit(sequences, per_token=True)
    return engine.submit(sequences)


def _probe(engine: Engine, batch: BatchConfig, embed: EmbedConfig) -> Callable[[Record], Callable[[], Rows]]:
    """--reuse's check: a record submitted as a chunk of its own (windows and all), its row waited for on call."""

    def probe(record: Record) -> Callable[[], Rows]:
        work = ChunkWork.of(Chunk(0, 1, ""), [record], embed)
        batches = pack_batches([len(s) for s in work.items], _budget(batch), batch.batch_size)
        futures = [(items, _submit(engine, work, items)) for items in batches]

        def row() -> Rows:
            for items, future in futures:
                work.fill(items, future.result())
            return work.rows()

        return row

    return probe


def _budget(batch: BatchConfig) -> int:
    """The token budget; callers of embed_records without build_engine may leave it unset: the batch size bounds."""
    return batch.max_tokens if batch.max_tokens is not None else sys.maxsize


def _chunk_work(chunk: Chunk, valid: list[Record], embed: EmbedConfig, reuse: ChunkReuse | None,
                summary: EmbedSummary, progress: ProgressFn | None) -> ChunkWork:  # fmt: skip
    """A chunk's work: its records to compute, with the rows that earlier outputs hold copied (--reuse)."""
    if reuse is None:
        return ChunkWork.of(chunk, valid, embed)
    rest, reused = reuse.split(valid)
    work = ChunkWork.of(chunk, rest, embed)
    if reused is not None:
        work.reused = reused
        reused.count_into(summary, progress)
        summary.reused_from = reuse.counts
    return work


@contextmanager
def readable_source(source: str | os.PathLike, *, error: type[InputError] = FastaError) -> Iterator[str]:
    """Yields a path or URL that can be read twice: a stream (stdin '-', a named FIFO, bash's ``<(zcat x.gz)``)
    is copied to a temporary file first, read once, as it arrives.

    Raises:
        FastaError (or ``error``): The stream cannot be read.
    """
    if not storage.is_stream(source):
        yield str(source)
        return
    try:
        spooled = storage.spool(source)
    except StorageError as exc:
        raise error(str(exc)) from exc
    try:
        yield spooled
    except InputError as exc:  # a message names the input as given, not its temporary copy
        if spooled not in str(exc):
            raise
        raise type(exc)(str(exc).replace(spooled, str(source)), exc.param) from exc
    finally:
        os.unlink(spooled)


def _scan_label(fasta: str, shard: ShardConfig | None, source: InputSource) -> str:
    """The input as a scan's problems name it: a shard's slice numbers its records from its own first one."""
    if shard is None or source.slice is None:
        return fasta
    start, stop = source.slice.range
    return f"{fasta}, shard {shard.index} of {shard.count} (bytes {start}..{stop}, records counted from its first)"


def run_identity(scan: FastaScan, model_identity: str, dtype: str, embed: EmbedConfig, inputs: InputConfig,
                 shard: ShardConfig, *, source_slice: InputSlice | None = None,
                 family: str = "esm2") -> dict:  # fmt: skip
    """The run's identity (io.identity.embed_identity) for this scan of the input; ``family``: esm2 or esmc. A shard
    of an input split by bytes covers its own slice (its records, its byte range, the file's size and stamp)."""
    return embed_identity(input_sha256=scan.sha256, input_records=scan.records, weights=model_identity, dtype=dtype,
                          embed=embed, inputs=inputs, shard=shard, model_family=family,
                          input_slice=source_slice.identity() if source_slice is not None else None)  # fmt: skip


def chunk_options(identity: dict) -> dict:
    """The identity without the input: committed chunks of other options are never reused."""
    return {k: v for k, v in identity.items() if not k.startswith("input_")}


def run_metadata(fasta: str, model: ModelConfig, embed: EmbedConfig, setup: EngineSetup, identity: dict,
                 inputs: InputConfig | None = None) -> dict:  # fmt: skip
    """What the output file records about how it was made."""
    return {
        "model": model.model,
        "model_source": setup.model.source,
        "random_weights": setup.model.dummy,
        "layers": list(setup.layers),
        "pooling": embed.pooling,
        "dtype": setup.dtype,
        "truncate": embed.truncate,
        "long_sequences": embed.long_sequences,
        **(
            {"window": {"width": embed.truncate, "overlap": embed.window_overlap, "rule": WINDOW_RULE}}
            if embed.long_sequences == "window"
            else {}
        ),  # fmt: skip
        "input": fasta,
        "output_dtype": embed.output_dtype,
        "allow_duplicate_ids": bool(inputs and inputs.allow_duplicate_ids),  # merge checks ids across parts
        "esm2cli_version": __version__,
        # Bit-identical vectors are guaranteed for one device type, dtype and torch version (the forward is
        # batch-invariant): what a rerun must match to reproduce this file bit for bit.
        "numerics": {
            "torch": importlib.metadata.version("torch"),
            "device_type": sorted({"cuda" if d.is_cuda else "cpu" for d in setup.devices}),
            "batch_invariant": True,
            "forward_revision": FORWARD_REVISION,
        },
        "identity": identity,
    }


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
    progress_factory: Callable[[int, int | None], ProgressFn] | None = None,
    setup: EngineSetup | None = None,
    reuse: Sequence[str] = (),
    weights: str | None = None,
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
        progress_factory: Given the sequences and the residues to compute, returns the per-batch callback.
        setup: An engine already built for ``model`` and ``embed`` (the Python API's): used, left running.
        reuse: Earlier outputs (files, directories or prefixes of parts): rows of theirs made with these
            weights and options are copied for the records whose sequence they hold, not computed.
        weights: The identity of the weights ``setup`` loaded, taken when it loaded them (the Python API's);
            None: hashed here before loading and confirmed after.

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
    from esm2cli.model.architecture import model_family, resolve_source

    shard_cfg = shard or ShardConfig()
    target = output_target(output, shard)
    hint = "" if shard else " (or add --shard-count to write parts into it)"
    check_target(target, {"the input file": fasta}, directory_hint=hint)  # first: says more than a wrong extension
    storage.check_output_name(output, sharded=shard is not None)
    if embed.long_sequences == "window":  # the overlap means nothing to the other modes
        check_overlap(embed.truncate, embed.window_overlap)
    if embed.contacts and embed.long_sequences == "window":
        raise ConfigError("--contacts needs each protein in one window: use --long-sequences truncate or error")
    with OutputLock(target), readable_source(fasta) as path, shard_source(path, str(fasta), shard) as source:
        scan = scan_fasta(source.path, embed.truncate, embed.max_length, source.span)
        check_scan(scan, _scan_label(str(fasta), shard, source), inputs, allow_empty=source.slice is not None)
        if hdf5.is_hdf5(target):
            hdf5.check_run(target, scan, contacts=embed.contacts)  # h5py there, ids unique: before any compute
        sources = reuse_stamps(reuse) if reuse else None  # a bad --reuse path stops the run before the model loads
        placement = setup.placement if setup is not None else resolve_placement(model)
        dtype = placement.dtype
        model = replace(model, dtype=dtype)

        def identity_of(weights: str, family: str) -> dict:
            return run_identity(
                scan, weights, dtype, embed, inputs, shard_cfg, source_slice=source.slice, family=family
            )

        stamp = None if weights else stamp_weights(resolve_source(model.model), model.load_format)
        known = weights or (stamp.identity if stamp else None)
        family = model_family(model.model)  # as named; confirmed by the model loaded below
        if known is not None and is_complete(target, identity_of(known, family), overwrite):
            return EmbedSummary(already_complete=True)
        owned = setup is None
        if setup is None:
            setup = build_engine(model, embed, batch, placement=placement)
        if stamp is not None:  # the bytes hashed are the bytes loaded, or the run stops here
            weights = stamp.confirm(setup.model.source, setup.model.config.to_dict())
        assert weights is not None
        identity = identity_of(weights, setup.model.family)
        if is_complete(target, identity, overwrite):
            return EmbedSummary(already_complete=True)
        plan = EmbedPlan(
            source=source, target=target, scan=scan, setup=setup, identity=identity, reuse=sources, model=model,
            embed=embed, inputs=inputs, shard=shard, overwrite=overwrite, owned=owned,
            progress_factory=progress_factory,
        )  # fmt: skip
        return _embed_into(plan)


@dataclass(frozen=True, kw_only=True)
class EmbedPlan:
    """What the compute of one embed run works from, once the output is known to need it.

    Attributes:
        source: Where the records are read (the whole input, or a shard's slice of it).
        target: The file written (the output, or the shard's part).
        scan: The check pass over the source's records: counts, digests, invalid records.
        setup: The runtime (engine, model, devices, the decided batch budget).
        identity: The run identity every chunk and the output record.
        reuse: The files of --reuse and their fingerprints; None without --reuse.
        owned: The engine is started and closed here (the Python API keeps its own running).
    """

    source: InputSource
    target: str
    scan: FastaScan
    setup: EngineSetup
    identity: dict
    reuse: tuple[list[str], list[dict]] | None
    model: ModelConfig
    embed: EmbedConfig
    inputs: InputConfig
    shard: ShardConfig | None
    overwrite: bool
    owned: bool = True
    progress_factory: Callable[[int, int | None], ProgressFn] | None = None

    def positions(self) -> tuple[int, int]:
        """The 0-based record positions [start, stop) of the scan this run embeds."""
        if self.shard is None or self.source.slice is not None:
            return 0, self.scan.records  # the scan holds this shard's records only
        return self.shard.range(self.scan.records)  # a plain gzip, read whole: the shard's share by count


def _log_plan(plan: EmbedPlan, invalid: list[Record], todo: int) -> None:
    """The startup lines: the shard, the invalid records skipped, the long sequences and what becomes of them."""
    embed, scan, shard = plan.embed, plan.scan, plan.shard
    if shard:
        start, stop = plan.positions()
        log.info("shard %d of %d: %d record(s), %d to embed", shard.index, shard.count, stop - start, todo)
    if invalid:
        log.warning("skipping %d invalid record(s):\n%s", len(invalid), describe_invalid(invalid))
    if scan.too_long and embed.long_sequences == "truncate":
        log.warning("sequences longer than %d residues are truncated (column 'truncated')", embed.truncate)
    elif scan.too_long and embed.long_sequences == "window":
        log.info("%d sequence(s) longer than %d residues are embedded whole, in windows overlapping by %d",
                 scan.too_long, embed.truncate, embed.window_overlap)  # fmt: skip
        if warning := overlap_warning(embed.truncate, embed.window_overlap):
            log.warning("%s", warning)


def _embed_into(plan: EmbedPlan) -> EmbedSummary:
    """The compute of embed_fasta, once the output is known to need it."""
    start_pos, stop_pos = plan.positions()
    scan, embed, setup = plan.scan, plan.embed, plan.setup
    invalid = [rec for rec in scan.invalid if start_pos < rec.position <= stop_pos]
    todo = (stop_pos - start_pos) - len(invalid)
    _log_plan(plan, invalid, todo)
    batch = setup.batch  # the budget build_engine decided for these devices (the caller's batch went into it)
    hidden, layers = setup.model.hidden_size, setup.layers
    metadata = run_metadata(plan.source.name, plan.model, embed, setup, plan.identity, plan.inputs)
    schema = build_schema(hidden, layers, embed.per_token, metadata, contacts=embed.contacts,
                          dtype=embed.output_dtype)  # fmt: skip
    options = chunk_options(plan.identity) | ({"reuse": plan.reuse[1]} if plan.reuse else {})  # a change is detected
    chunks = ChunkStore(plan.target, schema, hidden, layers, options)
    earlier = chunks.open(plan.overwrite)
    reuser = open_reuse(plan.reuse[0], plan.identity, embed, layers, hidden) if plan.reuse else None
    if earlier:
        log.info("resuming: %d chunk(s) committed by an earlier run are checked against the input", len(earlier))
    per_residue = 4 * hidden * len(layers) * embed.per_token + 4 * embed.truncate * embed.contacts  # L^2 <= L * W
    limit = ChunkLimit(batch, per_residue, 4 * hidden * len(layers))
    # Bounded bytes alive (config.CHUNK_BYTES); each written chunk's freed rows go back to the system.
    writer = BackgroundWriter(chunks, depth=WRITER_DEPTH, after_write=release_free_memory)
    # The bar counts residues, so that its ETA holds while the longest proteins come last in each chunk; with
    # --reuse, which rows cost nothing is known only chunk by chunk, so it counts sequences there.
    lengths = scan.record_lengths[start_pos:stop_pos]
    residues = None if reuser else sum(computed_residues(n, embed) for n in lengths if n)
    progress = plan.progress_factory(todo, residues) if plan.progress_factory else None
    start = time.perf_counter()
    try:
        with setup.engine if plan.owned else nullcontext(setup.engine) as engine:
            mine = (r for r in plan.source.records(embed.max_length) if start_pos < r.position <= stop_pos)
            summary = embed_records(
                mine, engine, writer, batch, embed, progress=progress, earlier=earlier, limit=limit,
                digests=scan.record_digests, reuse=reuser,
            )  # fmt: skip
            summary.oom_splits = engine.oom_splits()
        writer.finish()
    except Interrupted:
        _keep_finished(writer)
        raise
    except BaseException:
        writer.abort()
        raise
    finally:
        if reuser:
            reuser.close()
    if summary.recomputed:
        log.warning("%d chunk(s) of an earlier run no longer match the input: recomputed", summary.recomputed)
    chunks.commit(summary.chunks, todo)
    summary.seconds = time.perf_counter() - start
    summary.skipped = [rec.id or f"#{rec.position}" for rec in invalid]
    summary.devices = [d.name for d in setup.devices]
    summary.model, summary.dtype = plan.model.model, setup.dtype
    return summary


def _keep_finished(writer: BackgroundWriter) -> None:
    """On an interruption, lets the chunks already complete reach the disk (they are the rerun's head start)."""
    try:
        writer.finish()
    except Exception:  # the chunk being written when the signal came is dropped; the rest are safe
        writer.abort()
