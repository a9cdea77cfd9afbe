"""Parquet outputs: the one atomic table writer (TableWriter), embeddings over it, its background thread,
concatenation and metadata."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from esm2cli.errors import DamagedFileError, OutputError
from esm2cli.io.schema import (
    METADATA_KEY,
    ROW_GROUP_BYTES,
    Rows,
    _slices,
    as_metadata,
    embedding_columns,
    is_damage,
    open_parquet,
    record_batch,
    write_options,
)
from esm2cli.io.storage import AtomicFile, open_input


def read_metadata(path: str | os.PathLike) -> dict:
    """The esm2cli metadata of a Parquet (or HDF5) file written by esm2cli ({} for any other file)."""
    from esm2cli.io import hdf5

    if hdf5.is_hdf5(path):
        return hdf5.read_metadata(path)
    with open_input(path) as handle:
        try:
            metadata = pq.read_schema(handle).metadata or {}
        except (pa.ArrowInvalid, OSError):  # not Parquet, or a damaged footer (pyarrow: "Couldn't deserialize thrift")
            return {}
    try:
        return as_metadata(json.loads(metadata.get(METADATA_KEY, b"{}")))
    except ValueError:
        return {}


def _os_error(path: str, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


ROW_GROUP_ROWS = 1 << 16  # rows of a TableWriter's row group unless its caller says otherwise
MAX_GROUP_ROWS = 1 << 20  # pyarrow's own cap on a row group: for writers whose groups are cut by bytes


class TableWriter:
    """A Parquet table written in row groups beside ``url`` and renamed over it on commit.

    Rows are buffered and written in row groups of ``row_group_rows`` rows as soon as that many wait; flush()
    writes what waits as a (last, smaller) group. Every file is written with io.schema.write_options (page
    checksums on). A crash, an abort or a full disk leaves no file at ``url`` and no temporary file beside it,
    and whatever was at ``url`` before stays as it was. An OSError (a full disk) becomes one line,
    "cannot write <url>: <reason>".
    """

    def __init__(self, url: str | os.PathLike, schema: pa.Schema, *, row_group_rows: int = ROW_GROUP_ROWS):
        self.url = str(url)
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.rows_written = 0
        self._buffer: list[pa.RecordBatch] = []
        self._rows = 0
        self._file = AtomicFile(self.url)
        try:
            self._writer = pq.ParquetWriter(self._file.handle, schema, **write_options(schema))
        except BaseException as exc:  # a signal or an error here must not leave the temporary file behind
            self._file.abort()
            if isinstance(exc, OSError):
                raise _os_error(self.url, exc) from exc
            raise

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the rows that wait for their row group."""
        return sum(batch.nbytes for batch in self._buffer)

    def write(self, rows: pa.RecordBatch | pa.Table) -> None:
        """Buffers rows of the schema; every full row group is written at once.

        Raises:
            OutputError: The file cannot be written (a full disk, say); abort() then drops it.
        """
        self._buffer.extend(rows.to_batches() if isinstance(rows, pa.Table) else [rows])
        self._rows += rows.num_rows
        if self._rows >= self.row_group_rows:
            table = pa.Table.from_batches(self._buffer, schema=self.schema)
            full = self._rows - self._rows % self.row_group_rows
            self._write(table.slice(0, full))
            rest = table.slice(full)
            self._buffer, self._rows = [b for b in rest.to_batches() if b.num_rows], rest.num_rows

    def write_columns(self, columns: dict) -> None:
        """Buffers rows given as a dict of equal-length columns of the schema."""
        self.write(pa.RecordBatch.from_pydict(columns, schema=self.schema))

    def flush(self) -> None:
        """Writes every buffered row now (nothing when none are buffered).

        Raises:
            OutputError: The file cannot be written; abort() then drops it.
        """
        if self._buffer:
            self._write(pa.Table.from_batches(self._buffer, schema=self.schema))
            self._buffer, self._rows = [], 0

    def _write(self, table: pa.Table) -> None:
        try:
            self._writer.write_table(table, row_group_size=self.row_group_rows)
        except OSError as exc:
            raise _os_error(self.url, exc) from exc
        self.rows_written += table.num_rows

    def commit(self) -> None:
        """Writes what is buffered, closes the file and makes it appear at its path.

        Raises:
            OutputError: The file cannot be written; nothing is left behind and an earlier file stays.
        """
        try:
            self.flush()
            self._writer.close()
        except (OSError, OutputError) as exc:
            self._file.abort()
            if isinstance(exc, OSError):
                raise _os_error(self.url, exc) from exc
            raise
        self._file.commit()

    def abort(self) -> None:
        """Closes and drops the file; whatever was at the path before is left as it was."""
        try:
            self._writer.close()
        except OSError:  # a full disk fails the close too; the file is dropped all the same
            pass
        finally:
            self._file.abort()


class EmbeddingWriter:
    """Streams embedding rows to a file in row groups of at most ROW_GROUP_BYTES, through a TableWriter: the file
    appears at ``path`` only on commit.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, hidden: int, layers: Sequence[int]):
        self.path = str(path)
        self.schema = schema
        self.hidden = hidden
        self.pooled_cols = embedding_columns(layers, "embedding")
        self.token_cols = embedding_columns(layers, "per_token")
        self._table = TableWriter(self.path, schema, row_group_rows=MAX_GROUP_ROWS)  # groups cut by bytes

    def write(self, rows: Rows) -> None:
        """Writes rows as one or more row groups (a slice of at most ROW_GROUP_BYTES each).

        Raises:
            OutputError: The file cannot be written (a full disk, say).
        """
        for start, stop in _slices(rows, self.hidden, ROW_GROUP_BYTES):
            self._table.write(self._batch(rows, start, stop))
            self._table.flush()

    def _batch(self, rows: Rows, start: int, stop: int) -> pa.RecordBatch:
        return record_batch(rows, self.schema, self.hidden, list(self.pooled_cols), start, stop)

    def commit(self) -> None:
        """Closes the file and makes it visible at its path.

        Raises:
            OutputError: The file cannot be written; nothing is left behind.
        """
        self._table.commit()

    def abort(self) -> None:
        """Closes and drops the file; nothing appears at the final path."""
        self._table.abort()


_DONE = object()


class BackgroundWriter:
    """Hands chunks of rows to a sink (a ChunkStore) on a thread of its own, overlapping I/O with compute.

    At most ``depth`` chunks wait for the thread; write() blocks past that, which bounds memory.
    An error on the thread is raised by the next write(), or by finish(). ``after_write`` runs on the
    thread once each chunk is written and its rows dropped (the pipeline hands freed memory back there).
    """

    def __init__(self, writer, depth: int = 2, after_write: Callable[[], object] | None = None):
        self.writer = writer
        self.after_write = after_write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="esm2cli-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            if self._error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:  # reported to the producer on its next call
                    self._error = exc
            item = None  # the chunk's rows go before the next get(), not after it
            if self.after_write is not None:
                self.after_write()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, chunk, rows: Rows) -> None:
        """Queues one chunk of rows for the writer thread."""
        self._raise_if_failed()
        self._queue.put((chunk, rows))

    def discard(self, chunk) -> None:
        """Deletes a committed chunk at once (it is never among the queued ones)."""
        self.writer.discard(chunk)

    def finish(self) -> None:
        """Waits until every queued chunk is written."""
        self._queue.put(_DONE)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Drops what is queued and stops the thread."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()


def concatenate(sources: list[str], target: str, schema: pa.Schema, expected_rows: int | None = None) -> int:
    """Copies the row groups of Parquet files, in order, into one new file that appears atomically.

    Small row groups (one a chunk) are joined up to ROW_GROUP_BYTES.

    Returns:
        The number of rows written.

    Raises:
        OutputError: A source's columns differ from ``schema``, or the rows are not ``expected_rows``.
        DamagedFileError: A page of a source fails its checksum (its ``path`` names the source).
    """
    out = TableWriter(target, schema, row_group_rows=MAX_GROUP_ROWS)
    rows = 0
    try:
        for source_path in sources:
            with open_input(source_path) as handle:
                source = open_parquet(handle)
                if not source.schema_arrow.remove_metadata().equals(schema.remove_metadata()):
                    raise OutputError(f"{source_path}: its columns differ from those of {sources[0]}")
                for group in range(source.num_row_groups):
                    try:
                        table = source.read_row_group(group).replace_schema_metadata(schema.metadata)
                    except OSError as exc:
                        if is_damage(exc):
                            raise DamagedFileError(source_path) from exc
                        raise
                    rows += table.num_rows
                    if out.buffered_bytes and out.buffered_bytes + table.nbytes > ROW_GROUP_BYTES:
                        out.flush()
                    out.write(table)
        if expected_rows is not None and rows != expected_rows:
            raise OutputError(f"{len(sources)} files hold {rows} rows, expected {expected_rows}; this is a bug")
        out.commit()
    except BaseException as exc:
        out.abort()
        if isinstance(exc, OSError):
            raise _os_error(target, exc) from exc
        raise
    return rows
