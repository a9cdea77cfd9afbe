"""The hits of a search written out: TSV, BLAST's tabular m8, or Parquet; a file (atomically) or stdout.

m8 gives the 12 columns BLAST's ``-outfmt 6`` and MMseqs2 write, so that their readers take the file, but a search
of vectors aligns nothing: ``bitscore`` holds the cosine and ``evalue`` the E-value; ``pident`` is 100 x the cosine
(clipped at 0); ``length`` is the query's length; ``mismatch`` and ``gapopen`` are 0; the query spans 1 to its
length and the target 1 to its length. A missing E-value (a database without a null model) is ``NA``.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from esm2cli.errors import ConfigError, OutputExistsError
from esm2cli.io import storage
from esm2cli.search.index import Hit

TSV_COLUMNS = ("query", "target", "score", "evalue", "rank")
M8_COLUMNS = ("qseqid", "sseqid", "pident", "length", "mismatch", "gapopen", "qstart", "qend", "sstart", "send",
              "evalue", "bitscore")  # fmt: skip
PARQUET_SCHEMA = pa.schema([("query", pa.string()), ("target", pa.string()), ("score", pa.float32()),
                            ("evalue", pa.float64()), ("rank", pa.int32()), ("query_length", pa.int32()),
                            ("target_length", pa.int32())])  # fmt: skip


def _evalue(value: float | None) -> str:
    return "NA" if value is None else f"{value:.3g}"


def tsv_line(query: str, hit: Hit) -> str:
    return f"{query}\t{hit.target}\t{hit.score:.6f}\t{_evalue(hit.evalue)}\t{hit.rank}\n"


def m8_line(query: str, query_length: int, hit: Hit) -> str:
    pident = 100.0 * max(hit.score, 0.0)
    fields = (query, hit.target, f"{pident:.3f}", query_length, 0, 0, 1, query_length, 1, hit.length or 0,
              _evalue(hit.evalue), f"{hit.score:.6f}")  # fmt: skip
    return "\t".join(map(str, fields)) + "\n"


def check_output(output: str, overwrite: bool, inputs: Sequence[str] = (), what: str = "hits") -> None:
    """Refuses, before any work, an output that exists (unless overwrite), is a directory, or is one of the inputs
    (a query file, or a file inside the database folder: --overwrite must not replace what is being read).

    Raises:
        OutputExistsError: The file exists and overwrite is False.
        ConfigError: The output is a directory or an input.
    """
    if output == "-":
        return
    if not storage.is_url(output) and os.path.isdir(output):
        raise ConfigError(f"{output} is a directory: name a file for the {what}")
    _refuse_input(output, inputs, what)
    if storage.exists(output) and not overwrite:
        raise OutputExistsError(f"{output} already exists: add --overwrite to replace it")


def _refuse_input(output: str, inputs: Sequence[str], what: str) -> None:
    """Refuses an output that is an input file or lies inside an input folder (local paths only)."""
    if storage.is_url(output):
        return
    target = os.path.realpath(output)
    for path in inputs:
        if storage.is_url(path) or path == "-":
            continue
        source = os.path.realpath(path)
        if target == source or target.startswith(source.rstrip(os.sep) + os.sep):
            raise ConfigError(f"{output}: is the input {path} (or inside it): name another file for the {what}")


class _WholeWrites:
    """A raw stdout written whole: a raw write may take only part of its bytes (at a file size limit or a full
    disk: the next write then fails), and neither pyarrow nor ``write``'s callers look at how many it took."""

    def __init__(self, raw: io.RawIOBase):
        self._raw = raw

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while view:
            taken = self._raw.write(view)
            if not taken:  # None: a non-blocking stdout that is full; 0 would loop for ever
                raise BlockingIOError(f"stdout took none of {len(view)} bytes")
            view = view[taken:]
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    @property
    def closed(self) -> bool:
        return self._raw.closed


def _stdout() -> IO[bytes]:
    # PYTHONUNBUFFERED (the image sets it) makes sys.stdout.buffer the raw file, whose short writes lose bytes
    out = sys.stdout.buffer
    return _WholeWrites(out) if isinstance(out, io.RawIOBase) else out  # type: ignore[return-value]


class HitWriter:
    """Writes hits in one format to a file (which appears only when close() succeeds) or to stdout ('-').

    Use as a context manager: an exception aborts the file, leaving any earlier one as it was.
    """

    def __init__(self, output: str, fmt: str):
        if fmt not in ("tsv", "m8", "parquet"):
            raise ConfigError(f"--format {fmt}: use tsv, m8 or parquet")
        self.format = fmt
        self.hits = 0
        self._file = None if output == "-" else storage.AtomicFile(output)
        self._binary: IO[bytes] = _stdout() if self._file is None else self._file.handle
        self._parquet = pq.ParquetWriter(self._binary, PARQUET_SCHEMA) if fmt == "parquet" else None
        if fmt == "tsv":
            self._binary.write(("\t".join(TSV_COLUMNS) + "\n").encode())

    def write(self, queries: Sequence[tuple[str, int]], hits: Sequence[Sequence[Hit]]) -> None:
        """Writes the hits of each query: ``queries`` are (id, length) pairs, ``hits`` their lists, in order."""
        self.hits += sum(map(len, hits))
        if self._parquet is not None:
            self._parquet.write_table(_table(queries, hits))
            return
        lines = []
        for (query, length), found in zip(queries, hits, strict=True):
            for hit in found:
                lines.append(tsv_line(query, hit) if self.format == "tsv" else m8_line(query, length, hit))
        self._binary.write("".join(lines).encode())

    def __enter__(self) -> HitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.abort()

    def close(self) -> None:
        """Finishes the output: the file appears at its name."""
        if self._parquet is not None:
            self._parquet.close()
        if self._file is not None:
            self._file.commit()
        else:
            self._binary.flush()


def _table(queries: Sequence[tuple[str, int]], hits: Sequence[Sequence[Hit]]) -> pa.Table:
    pairs = [(query, hit) for query, found in zip(queries, hits, strict=True) for hit in found]
    return pa.table(
        [[q for (q, _), _ in pairs], [h.target for _, h in pairs], [h.score for _, h in pairs],
         [h.evalue for _, h in pairs], [h.rank for _, h in pairs], [n for (_, n), _ in pairs],
         [h.length for _, h in pairs]],
        schema=PARQUET_SCHEMA,
    )  # fmt: skip
