"""esm2cli search: the queries of a FASTA file or an esm2cli output searched against a database, in batches.

A FASTA is embedded chunk by chunk with the database's own model and options (Index.embedder); an output's vectors
are read a row group at a time, after its identity is checked against the database's. Either way, memory holds one
batch of queries and their hits.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from esm2cli.errors import ConfigError, FastaError
from esm2cli.io.storage import OUTPUT_SUFFIXES, is_stream, is_url
from esm2cli.search.hits import HitWriter
from esm2cli.search.index import Index
from esm2cli.search.vectors import open_inputs, read_batches


@dataclass(frozen=True)
class SearchSummary:
    """What a search did, for the command's last line."""

    queries: int
    hits: int
    embedded: bool  # the queries were a FASTA, embedded here


@dataclass(frozen=True)
class QueryBatch:
    """Consecutive queries: their ids, lengths and vectors."""

    ids: list[str]
    lengths: list[int]
    vectors: np.ndarray


def is_output(query: str) -> bool:
    """True for an esm2cli output (a .parquet, .pq, .h5 or .hdf5 file, or a folder or prefix of them); else FASTA."""
    if is_stream(query):
        return False
    if not is_url(query) and os.path.isdir(query):
        return True
    return query.rstrip("/").lower().endswith(OUTPUT_SUFFIXES) or (is_url(query) and query.endswith("/"))


def output_batches(index: Index, query: str) -> Iterator[QueryBatch]:
    """The vectors of an esm2cli output, batch by batch, checked to be of the database's identity.

    Raises:
        InputError: Not an esm2cli output, or damaged.
        ConfigError: Its vectors are of another identity (what differs is named).
    """
    try:
        sources = open_inputs([query], command="search")
    except ConfigError:  # several layers: the database's is the one to read
        sources = open_inputs([query], layer=int(index.identity["layer"]), command="search")
    for source in sources:
        index.check_query_identity(source.identity, source.path)
    for batch in read_batches(sources):
        yield QueryBatch(batch.ids, [int(n) for n in batch.lengths], batch.vectors)


SKIP_HINT = "(use --skip-invalid to embed the others)"  # embed's advice (io.fasta): search has no such option


@contextmanager
def _no_skip_hint() -> Iterator[None]:
    """embed's refusal of invalid records, without its advice of an option search does not have."""
    try:
        yield
    except FastaError as exc:
        if SKIP_HINT not in str(exc):
            raise
        raise FastaError(str(exc).replace(SKIP_HINT, "(search embeds every record: fix or remove them)")) from None


def fasta_batches(index: Index, query: str, embedder_options: dict) -> Iterator[QueryBatch]:
    """The records of a FASTA file embedded with the database's model, chunk by chunk.

    Raises:
        FastaError: The file is unreadable or holds records that cannot be embedded.
        ConfigError: The model or options given compute vectors of another identity.
    """
    with index.embedder(**embedder_options) as embedder, _no_skip_hint():
        for batch in embedder.iter_fasta(query):
            column = batch.column(batch.schema.get_field_index("embedding"))
            assert isinstance(column, pa.FixedSizeListArray)
            vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(batch), -1)
            ids = batch.column(batch.schema.get_field_index("id")).to_pylist()
            lengths = batch.column(batch.schema.get_field_index("length")).to_pylist()
            yield QueryBatch(ids, lengths, vectors)


def _check_no_model_options(query: str, options: dict) -> None:
    # an output's vectors are computed already: a model option would be ignored without a word
    given = [f"--{name.replace('_', '-')}" for name in ("model", "load_format", "dtype") if options.get(name)]
    if given:
        raise ConfigError(
            f"{query} holds vectors already: {', '.join(given)} applies to a FASTA query only "
            "(the output's own identity is checked against the database's)"
        )


def search_file(
    index: Index,
    query: str,
    output: str,
    *,
    output_format: str = "tsv",
    k: int,
    filters: dict | None = None,
    embedder_options: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> SearchSummary:
    """Searches every query of ``query`` (a FASTA or an esm2cli output) and writes the hits.

    Args:
        index: The database.
        query: A FASTA file (plain or .gz, a path or URL) or an esm2cli output.
        output: The hits file (a path or URL; it appears once complete), or '-' for stdout.
        output_format: tsv, m8 or parquet (search.hits).
        k: Hits per query at most.
        filters: min_score, max_evalue, nprobe (Index.search_vectors).
        embedder_options: Embedder arguments for a FASTA (devices, model, load_format, dtype, batch_size).
        progress: Told the number of queries of each batch searched.

    Raises:
        InputError, FastaError, ConfigError: As output_batches, fasta_batches and Index.search_vectors.
    """
    filters = filters or {}
    index.check_request(k, filters.get("max_evalue"), filters.get("min_score"))  # before a model loads, a file is read
    embedded = not is_output(query)
    if not embedded:
        _check_no_model_options(query, embedder_options or {})
    batches = fasta_batches(index, query, embedder_options or {}) if embedded else output_batches(index, query)
    # The first batch before the output opens: a query refused (another model, a bad FASTA) writes nothing at all,
    # not even a header on stdout.
    first = next(batches, None)
    queries = 0
    with HitWriter(output, output_format) as writer:
        for batch in itertools.chain([first] if first is not None else [], batches):
            hits = index.search_vectors(batch.vectors, k, **(filters or {}))
            writer.write(list(zip(batch.ids, batch.lengths, strict=True)), hits)
            queries += len(batch.ids)
            if progress:
                progress(len(batch.ids))
    return SearchSummary(queries, writer.hits, embedded)
