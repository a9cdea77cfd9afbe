"""The score job: pseudo-log-likelihoods and mutant scores from ESM-2's masked-LM head, over the Engine.

Every score reads a log-probability vector at one position of one protein, from an input that is
either the protein's window with that position masked (pseudo-log-likelihood, masked marginal) or the
window unmasked (wild-type marginal). Those inputs are the unit of work: the distinct ones are collected,
sorted by length and cut into batches under the token budget like any embedding batch, and run on
every replica; an input asked for by many mutants (every mutant at one position, identical proteins)
is computed once. A position of a protein longer than the window is read from the window of ``window``
residues that centres it, clamped to the protein's ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from esm2cli.config import (
    DEFAULT_TRUNCATE,
    SCORE_METHODS,
    SCORE_MODES,
    BatchConfig,
    EmbedConfig,
    ModelConfig,
    ScoreConfig,
    __version__,
)
from esm2cli.errors import ConfigError, FastaError, MutantError
from esm2cli.io import storage
from esm2cli.io.fasta import describe_invalid, read_records, scan_fasta
from esm2cli.io.identity import one_stream, score_identity, stamp_weights
from esm2cli.io.lock import OutputLock
from esm2cli.io.parquet import TableWriter
from esm2cli.io.records import Record
from esm2cli.io.targets import check_target, is_complete, output_target
from esm2cli.jobs.mutants import AMINO_ACIDS, MutantTable, read_mutant_table
from esm2cli.jobs.pipeline import readable_source
from esm2cli.model.architecture import model_family, resolve_source
from esm2cli.runtime.batching import pack_batches
from esm2cli.runtime.engine import Engine, build_engine, resolve_placement

log = logging.getLogger(__name__)

CHUNK_POSITIONS = 1 << 15  # positions planned, computed and released together: bounds memory on any input
ROW_GROUP_ROWS = 1 << 16
METADATA_KEY = b"esm2cli"

ProgressFn = Callable[[int, int], None]  # (positions scored, residues computed) just finished


def window_start(position: int, length: int, window: int) -> int:
    """The 0-based start of the window of ``window`` residues that centres ``position``, clamped to the protein.

    Args:
        position: 0-based residue position.
        length: Residues in the protein.
        window: Residues a window holds.
    """
    if length <= window:
        return 0
    return min(max(position - window // 2, 0), length - window)


@dataclass
class _Inputs:
    """The distinct LM inputs of a chunk; each is computed once, however many positions read it.

    An input is a window with one position masked (read there) or unmasked (read at every position
    that uses it); only the positions read come back from the replica, and only they are kept.
    """

    index: dict[tuple[str, int | None], int] = field(default_factory=dict)
    items: list[tuple[str, int | None]] = field(default_factory=list)
    reads: list[dict[int, int]] = field(default_factory=list)  # per input: position read -> row of its result
    uses: list[int] = field(default_factory=list)  # per input: the protein positions that read it, for progress

    def add(self, window_seq: str, masked: int | None, position: int) -> tuple[int, int]:
        """Registers a read of ``position`` (0-based, in the window); returns (input, row of its result)."""
        key = (window_seq, masked)
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.items)
            self.items.append(key)
            self.reads.append({})
            self.uses.append(0)
        self.uses[i] += 1
        rows = self.reads[i]
        return i, rows.setdefault(position, len(rows))

    def item(self, i: int) -> tuple[str, int | None, list[int]]:
        """What a replica's lm_log_probs takes for input i: (sequence, masked, positions read)."""
        seq, masked = self.items[i]
        return seq, masked, list(self.reads[i])


@dataclass
class _Protein:
    """One protein of a chunk: the positions it needs (0-based) and where each is read from."""

    record: Record
    positions: list[int]
    reads: list[tuple[int, int]] = field(default_factory=list)  # (input, row of that input's result)
    key: int = -1  # mutations mode: the protein's index in the MutantTable

    def plan(self, inputs: _Inputs, window: int, masked: bool) -> None:
        seq = self.record.sequence
        for pos in self.positions:
            start = window_start(pos, len(seq), window)
            at = pos - start
            self.reads.append(inputs.add(seq[start : start + window], at if masked else None, at))


@dataclass
class _Chunk:
    proteins: list[_Protein]
    inputs: _Inputs
    results: list = field(default_factory=list)
    missing: int = 0

    def log_probs(self, protein: _Protein) -> np.ndarray:
        """(positions, vocabulary) log-probabilities at the protein's positions, in its order."""
        return np.stack([self.results[i][row] for i, row in protein.reads])


def log_prob_chunks(
    engine: Engine,
    chunks: Iterable[list[_Protein]],
    batch: BatchConfig,
    window: int,
    masked: bool,
    progress: ProgressFn | None = None,
) -> Iterator[_Chunk]:
    """Computes the log-probabilities every protein of every chunk needs; yields chunks in order as they finish.

    Batches of one chunk are submitted while the earlier chunks' batches are still running, so the
    replicas do not wait at chunk boundaries; the engine's bounded queues hold the submission back.

    Raises:
        Exception: The first error a batch raised.
    """
    pending: deque[tuple[_Chunk, list[int], Future]] = deque()
    if batch.max_tokens is None:
        raise AssertionError("the token budget is decided by build_engine before scoring; this is a bug")
    max_tokens = batch.max_tokens

    def settle(block: bool) -> Iterator[_Chunk]:
        while pending and (block or pending[0][2].done()):
            chunk, indices, future = pending.popleft()
            for i, result in zip(indices, future.result(), strict=True):
                chunk.results[i] = result
            chunk.missing -= len(indices)
            if progress:
                inputs = chunk.inputs
                progress(sum(inputs.uses[i] for i in indices), sum(len(inputs.items[i][0]) for i in indices))
            if chunk.missing == 0:  # batches settle in submission order, so chunks finish in order
                yield chunk

    for proteins in chunks:
        inputs = _Inputs()
        for protein in proteins:
            protein.plan(inputs, window, masked)
        chunk = _Chunk(proteins, inputs, [None] * len(inputs.items), len(inputs.items))
        lengths = [len(seq) for seq, _ in inputs.items]
        for indices in pack_batches(lengths, max_tokens, batch.batch_size):
            future = engine.submit([inputs.item(i) for i in indices], method="lm_log_probs")
            pending.append((chunk, indices, future))
            yield from settle(block=False)
    yield from settle(block=True)


def chunked(proteins: Iterable[_Protein], positions: int = CHUNK_POSITIONS) -> Iterator[list[_Protein]]:
    """Groups proteins into chunks of about ``positions`` positions (a protein is never split)."""
    chunk: list[_Protein] = []
    size = 0
    for protein in proteins:
        chunk.append(protein)
        size += len(protein.positions)
        if size >= positions:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _schema(mode: str, metadata: dict) -> pa.Schema:
    if mode == "pll":
        fields = [
            pa.field("id", pa.string(), nullable=False),
            pa.field("length", pa.int32(), nullable=False),
            pa.field("pll", pa.float64(), nullable=False),
            pa.field("pseudo_perplexity", pa.float64(), nullable=False),
            pa.field("windowed", pa.bool_(), nullable=False),
        ]
    else:
        fields = [
            pa.field("id", pa.string(), nullable=False),
            pa.field("mutant", pa.string(), nullable=False),
            pa.field("score", pa.float64(), nullable=False),
        ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


@dataclass
class ScoreSummary:
    """What a score run did, for the closing line."""

    mode: str = "pll"
    proteins: int = 0
    positions: int = 0
    inputs: int = 0
    residues: int = 0
    rows: int = 0
    windowed: int = 0
    skipped_records: list[str] = field(default_factory=list)
    skipped_rows: int = 0
    oom_splits: int = 0
    seconds: float = 0.0
    devices: list[str] = field(default_factory=list)
    already_complete: bool = False


def _check_records(invalid: list[Record], records: int, valid: int, fasta: str, skip_invalid: bool) -> None:
    if invalid and not skip_invalid:
        raise FastaError(
            f"{fasta}: {len(invalid)} of {records} records cannot be scored "
            f"(use --skip-invalid to score the others):\n{describe_invalid(invalid)}"
        )
    if invalid:
        log.warning("skipping %d invalid record(s):\n%s", len(invalid), describe_invalid(invalid))
    if valid == 0:
        raise FastaError(f"{fasta}: no records to score" + (" (every record is invalid)" if records else ""))


def _mutant_proteins(source: str, fasta: str, cfg: ScoreConfig) -> tuple[list[_Protein], MutantTable]:
    """Reads the wild types and the mutant list and checks every row, before any compute.

    Returns:
        The proteins that have mutants, in FASTA order (``key``: their index in the table), and the table.

    Raises:
        FastaError, MutantError: Bad records, duplicate ids, or rows that cannot be scored (without skip_invalid).
    """
    records = list(read_records(source))
    invalid = [r for r in records if r.problem]
    valid = [r for r in records if not r.problem]
    _check_records(invalid, len(records), len(valid), fasta, cfg.skip_invalid)
    by_id: dict[str, Record] = {}
    for record in valid:
        if record.id in by_id:
            raise FastaError(f"{fasta}: id {record.id!r} occurs more than once; mutants name their protein by id")
        by_id[record.id] = record
    if cfg.mutations is None:
        raise ConfigError("mode mutations needs a mutant list; this is a bug")
    table = read_mutant_table(
        cfg.mutations,
        {rec_id: r.sequence for rec_id, r in by_id.items()},
        cfg.skip_invalid,
        skipped_ids=frozenset(r.id for r in invalid),
        single_id=valid[0].id if len(records) == 1 else None,
    )
    position = table.columns()["position"]
    proteins = [
        _Protein(by_id[rec_id], np.unique(position[subs]).tolist(), key=k)
        for k, (rec_id, subs) in enumerate(zip(table.proteins, table.by_protein(), strict=True))
    ]
    order = {r.id: n for n, r in enumerate(valid)}
    return sorted(proteins, key=lambda p: order[p.record.id]), table


def _tokens(lut: np.ndarray, letters: str) -> np.ndarray:
    return lut[np.frombuffer(letters.encode("ascii"), dtype=np.uint8)]


def _pll(chunk: _Chunk, protein: _Protein, lut: np.ndarray) -> float:
    """The sum over residues of log p(residue | its position masked); every position is read, in order."""
    seq = protein.record.sequence
    return float(chunk.log_probs(protein)[np.arange(len(seq)), _tokens(lut, seq)].sum(dtype=np.float64))


def pseudo_log_likelihoods(
    engine: Engine,
    sequences: Iterable[str],
    lut: np.ndarray,
    batch: BatchConfig,
    window: int = DEFAULT_TRUNCATE,
    progress: ProgressFn | None = None,
) -> list[float]:
    """The pseudo-log-likelihood (natural log) of each sequence, computed as ``esm2cli score --pll`` does.

    Args:
        engine: A started engine whose replicas carry the LM head.
        sequences: Validated residue strings.
        lut: The model's token ids by ASCII code (``LoadedModel.token_lut``).
        batch: Batch size and token budget (max_tokens decided).
        window: Residues per forward pass; longer sequences are scored in windows centred on each position.
        progress: Called with (positions, residues) as batches complete.
    """
    proteins = (_Protein(Record(str(i), "", s, i + 1), list(range(len(s)))) for i, s in enumerate(sequences))
    out: list[float] = []
    for chunk in log_prob_chunks(engine, chunked(proteins), batch, window, masked=True, progress=progress):
        out.extend(_pll(chunk, p, lut) for p in chunk.proteins)
    return out


class _Scorer:
    """Turns a chunk's log-probabilities into output rows, for one mode."""

    def __init__(self, cfg: ScoreConfig, lut: np.ndarray, table: MutantTable | None = None):
        self.cfg = cfg
        self.lut = lut
        self._aa = _tokens(lut, AMINO_ACIDS)
        if table is not None:
            self.scores = np.zeros(len(table.ids))
            self.subs = table.columns()
            self.by_protein = table.by_protein()

    def columns(self, chunk: _Chunk) -> dict | None:
        """The chunk's output rows (pll, all-substitutions); mutant scores are kept for the end instead."""
        if self.cfg.mode == "pll":
            return self._pll(chunk)
        if self.cfg.mode == "all-substitutions":
            return self._all_substitutions(chunk)
        for protein in chunk.proteins:
            self._mutants(protein, chunk.log_probs(protein).astype(np.float64))
        return None

    def _pll(self, chunk: _Chunk) -> dict:
        ids = [p.record.id for p in chunk.proteins]
        lengths = [len(p.record.sequence) for p in chunk.proteins]
        plls = [_pll(chunk, p, self.lut) for p in chunk.proteins]
        return {
            "id": ids,
            "length": lengths,
            "pll": plls,
            "pseudo_perplexity": [math.exp(-p / n) for p, n in zip(plls, lengths, strict=True)],
            "windowed": [n > self.cfg.window for n in lengths],
        }

    def _all_substitutions(self, chunk: _Chunk) -> dict:
        ids: list[str] = []
        mutants: list[str] = []
        scores: list[float] = []
        for protein in chunk.proteins:
            seq = protein.record.sequence
            lp = chunk.log_probs(protein).astype(np.float64)
            table = lp[:, self._aa] - lp[np.arange(len(seq)), _tokens(self.lut, seq)][:, None]  # (positions, 20)
            for i, wt in enumerate(seq):
                for j, aa in enumerate(AMINO_ACIDS):
                    if aa != wt:
                        mutants.append(f"{wt}{i + 1}{aa}")
                        scores.append(table[i, j])
            ids.extend([protein.record.id] * (len(mutants) - len(ids)))
        return {"id": ids, "mutant": mutants, "score": scores}

    def _mutants(self, protein: _Protein, lp: np.ndarray) -> None:
        subs = self.by_protein[protein.key]
        at = np.searchsorted(protein.positions, self.subs["position"][subs])  # row of lp for each substitution
        delta = lp[at, self.lut[self.subs["mt"][subs]]] - lp[at, self.lut[self.subs["wt"][subs]]]
        np.add.at(self.scores, self.subs["row"][subs], delta)


def score_fasta(
    fasta: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: ModelConfig,
    score: ScoreConfig,
    batch: BatchConfig,
    overwrite: bool = False,
    progress_factory: Callable[[int], ProgressFn] | None = None,
) -> ScoreSummary:
    """Scores the proteins of a FASTA file (or the mutants of a CSV against them) into one Parquet file.

    Output columns: ``id, length, pll, pseudo_perplexity, windowed`` for mode "pll"; ``id, mutant,
    score`` for "mutations" (in the CSV's row order) and "all-substitutions" (per protein, position by
    position, then in the order ACDEFGHIKLMNPQRSTVWY). Scores are natural logarithms.

    Args:
        fasta: A path, an fsspec URL (s3://...), or '-' for stdin.
        output: The Parquet file (a path or URL); written beside and renamed over on success.
        model: The model; its masked-LM head is loaded.
        score: The mode, method, mutant list, window and checks.
        batch: Batch size and token budget.
        overwrite: Replace an existing output (only once the new one is complete).
        progress_factory: Given the number of positions to score, returns the per-batch callback.

    Returns:
        The run's summary.

    Raises:
        FastaError, MutantError: The input is unreadable or holds records or mutants that cannot be scored.
        ConfigError: Mode or method unknown; OutputExistsError: the output exists and overwrite is False.
        OutputLockedError: Another live run writes the same output.
        ModelLoadError, DeviceError: The model (or its LM head) or devices are unusable.
        OutputError, StorageError: The output cannot be written. EngineError: a replica failed.
    """
    output = output_target(output)  # a link is written through: the commit's rename would replace it
    _check_run(str(fasta), output, score)
    summary = ScoreSummary(mode=score.mode)
    # A stream (stdin, a FIFO, <(zcat x.gz)) is read twice, from a copy: the check pass and the hash or the compute.
    mutants = readable_source(score.mutations, error=MutantError) if score.mutations else nullcontext(None)
    with OutputLock(output), readable_source(str(fasta)) as source, mutants as copy:  # one run at a time
        reading = replace(score, mutations=copy)
        proteins, table, total, input_sha256 = _plan(source, str(fasta), reading, summary)
        placement = resolve_placement(model)
        stamp = stamp_weights(resolve_source(model.model), model.load_format)
        hashes = _input_hashes(source, input_sha256, reading)
        identity = _run_identity(hashes, stamp.identity, placement.dtype, score, model_family(model.model))
        if is_complete(output, identity, overwrite):
            return ScoreSummary(mode=score.mode, already_complete=True)
        setup = build_engine(model, EmbedConfig(truncate=score.window), batch, lm_head=True, placement=placement)
        weights = stamp.confirm(setup.model.source, setup.model.config.to_dict())  # the bytes loaded are the ones named
        identity = _run_identity(hashes, weights, placement.dtype, score, setup.model.family)
        if is_complete(output, identity, overwrite):  # weights named only once loaded (a hub model not cached yet)
            return ScoreSummary(mode=score.mode, already_complete=True)
        batch = setup.batch
        progress = progress_factory(total) if progress_factory else None
        start = time.perf_counter()
        out = None
        try:
            out = TableWriter(output, _schema(score.mode, {**_metadata(model, score, setup), "identity": identity}),
                              row_group_rows=ROW_GROUP_ROWS)  # fmt: skip
            _compute(setup.engine, setup.model.token_lut, proteins, table, batch=batch, score=score, out=out,
                     summary=summary, progress=progress)  # fmt: skip
            out.commit()
        except BaseException:
            if out is not None:
                out.abort()
            raise
    summary.rows = out.rows_written
    summary.seconds = time.perf_counter() - start
    summary.devices = [d.name for d in setup.devices]
    return summary


def _input_hashes(source: str, input_sha256: str | None, score: ScoreConfig) -> tuple[str, str | None] | None:
    """(the records' hash, the mutant list's) for the identity (a streamed input is read from its copy).

    ``input_sha256`` is the check pass's hash of the records where _plan made one (None: hashed here).
    """
    mutants = None
    if score.mutations:
        digest = hashlib.sha256()
        with storage.open_input(score.mutations) as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        mutants = digest.hexdigest()
    return input_sha256 or scan_fasta(source).sha256, mutants


def _run_identity(hashes: tuple[str, str | None] | None, weights: str | None, dtype: str,
                  score: ScoreConfig, family: str) -> dict | None:  # fmt: skip
    """What makes a rerun the same run: the records and mutants read, the weights, and what changes the numbers.

    None where the weights are not named yet (a hub model not cached before loading) or the inputs cannot be
    hashed: never complete then.
    """
    if hashes is None or weights is None:
        return None
    return score_identity(input_sha256=hashes[0], mutations_sha256=hashes[1], weights=weights, dtype=dtype,
                          score=score, model_family=family)  # fmt: skip


def _check_run(fasta: str, output: str, score: ScoreConfig) -> None:
    """Refuses, before anything is read, options that cannot work and an output that must not be written."""
    if score.mode not in SCORE_MODES or score.method not in SCORE_METHODS:
        raise ConfigError(f"unknown score mode {score.mode!r} or method {score.method!r}; this is a bug")
    if score.mode == "mutations" and not score.mutations:
        raise ConfigError("mode mutations needs a mutant list; this is a bug")
    check_target(output, {"the FASTA": fasta, "the mutant list": score.mutations})
    if score.mutations and storage.is_stream(score.mutations) and one_stream(fasta, score.mutations):
        raise ConfigError(
            f"--mutations {score.mutations}: the FASTA is read from that stream; name a file for the list"
        )


def _plan(
    source: str, fasta: str, score: ScoreConfig, summary: ScoreSummary
) -> tuple[Iterable[_Protein], MutantTable | None, int, str | None]:
    """Checks the input before any compute; returns the proteins to score, the mutants, the positions in all,
    and the records' hash where the check pass made one (None for a mutant list)."""
    if score.mode == "mutations":
        proteins, table = _mutant_proteins(source, fasta, score)
        summary.skipped_rows = table.skipped
        return proteins, table, sum(len(p.positions) for p in proteins), None
    scan = scan_fasta(source)
    _check_records(scan.invalid, scan.records, scan.valid, fasta, score.skip_invalid)
    summary.skipped_records = [r.id or f"#{r.position}" for r in scan.invalid]
    every_position = (
        _Protein(record, list(range(len(record.sequence)))) for record in read_records(source) if not record.problem
    )
    return every_position, None, scan.residues, scan.sha256


def _metadata(model: ModelConfig, score: ScoreConfig, setup) -> dict:
    """What the output file records about how it was made."""
    return {
        "model": model.model, "model_source": setup.model.source, "random_weights": setup.model.dummy,
        "dtype": setup.dtype, "mode": score.mode, "method": "masked-marginal" if score.mode == "pll" else score.method,
        "window": score.window, "mutations": score.mutations, "esm2cli_version": __version__,
    }  # fmt: skip


def _compute(engine, lut, proteins, table, *, batch, score, out, summary, progress) -> None:
    """Runs every chunk of proteins on the engine and writes its rows (mutant scores once all are in)."""
    scorer = _Scorer(score, lut, table)
    masked = score.mode == "pll" or score.method == "masked-marginal"
    with engine:
        for chunk in log_prob_chunks(engine, chunked(proteins), batch, score.window, masked, progress):
            summary.proteins += len(chunk.proteins)
            summary.positions += sum(len(p.positions) for p in chunk.proteins)
            summary.inputs += len(chunk.inputs.items)
            summary.residues += sum(len(seq) for seq, _ in chunk.inputs.items)
            summary.windowed += sum(len(p.record.sequence) > score.window for p in chunk.proteins)
            columns = scorer.columns(chunk)
            if columns is not None:
                out.write_columns(columns)
        summary.oom_splits = engine.oom_splits()
    if table is not None:
        out.write_columns({"id": table.ids, "mutant": table.mutants, "score": scorer.scores})
