"""Parquet outputs: the streaming writer, its background thread, concatenation and metadata."""

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
    try:
        with open_input(path) as handle:
            metadata = pq.read_schema(handle).metadata or {}
        return as_metadata(json.loads(metadata.get(METADATA_KEY, b"{}")))
    except (pa.ArrowInvalid, ValueError):
        return {}


# Every page carries a CRC: a flipped byte in stored vectors is found when the file is read again (resume, merge,
# --reuse), never copied on as numbers.
WRITE_OPTIONS = {"compression": "zstd", "write_page_checksum": True}


def _os_error(path: str, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


class EmbeddingWriter:
    """Streams rows to a file in row groups of at most ROW_GROUP_BYTES; the file appears at ``path`` only on commit.

    A crash, an abort or a full disk leaves no file at ``path`` (and no temporary file beside it).
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, hidden: int, layers: Sequence[int]):
        self.path = str(path)
        self.schema = schema
        self.hidden = hidden
        self.pooled_cols = embedding_columns(layers, "embedding")
        self.token_cols = embedding_columns(layers, "per_token")
        self._file = AtomicFile(self.path)
        try:
            self._writer = pq.ParquetWriter(self._file.handle, schema, **write_options(schema))
        except BaseException as exc:  # a signal here too must not leave the temporary file behind
            self._file.abort()
            if isinstance(exc, OSError):
                raise _os_error(self.path, exc) from exc
            raise

    def write(self, rows: Rows) -> None:
        """Writes rows as one or more row groups.

        Raises:
            OutputError: The file cannot be written (a full disk, say).
        """
        for start, stop in _slices(rows, self.hidden, ROW_GROUP_BYTES):
            try:
                self._writer.write_batch(self._batch(rows, start, stop))
            except OSError as exc:
                raise _os_error(self.path, exc) from exc

    def _batch(self, rows: Rows, start: int, stop: int) -> pa.RecordBatch:
        return record_batch(rows, self.schema, self.hidden, list(self.pooled_cols), start, stop)

    def commit(self) -> None:
        """Closes the file and makes it visible at its path.

        Raises:
            OutputError: The file cannot be written; nothing is left behind.
        """
        try:
            self._writer.close()
        except OSError as exc:
            self._file.abort()
            raise _os_error(self.path, exc) from exc
        self._file.commit()

    def abort(self) -> None:
        """Closes and drops the file; nothing appears at the final path."""
        try:
            self._writer.close()
        except OSError:  # a full disk fails the close too; the file is dropped all the same
            pass
        finally:
            self._file.abort()


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

    Returns:
        The number of rows written.

    Raises:
        OutputError: A source's columns differ from ``schema``, or the rows are not ``expected_rows``.
        DamagedFileError: A page of a source fails its checksum (its ``path`` names the source).
    """
    out = AtomicFile(target)
    try:
        writer = pq.ParquetWriter(out.handle, schema, **write_options(schema))
    except BaseException as exc:  # a signal here too must not leave the temporary file behind
        out.abort()
        if isinstance(exc, OSError):
            raise _os_error(target, exc) from exc
        raise
    rows = 0
    pending: list[pa.Table] = []  # small row groups (one a chunk) are joined up to ROW_GROUP_BYTES

    def flush() -> None:
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=sum(t.num_rows for t in pending))
            pending.clear()

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
                    if pending and sum(t.nbytes for t in pending) + table.nbytes > ROW_GROUP_BYTES:
                        flush()
                    pending.append(table)
        flush()
        writer.close()
        if expected_rows is not None and rows != expected_rows:
            raise OutputError(f"{len(sources)} files hold {rows} rows, expected {expected_rows}; this is a bug")
    except BaseException as exc:
        try:
            writer.close()
        except OSError:  # a full disk fails the close too; the file is dropped all the same
            pass
        out.abort()
        if isinstance(exc, OSError):
            raise _os_error(target, exc) from exc
        raise
    out.commit()
    return rows
