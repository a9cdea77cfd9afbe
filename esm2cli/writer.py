"""Parquet output: the schema, streamed row groups, and an atomic rename on success."""

from __future__ import annotations

import json
import os
import queue
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esm2cli.errors import OutputError, OutputExistsError
from esm2cli.storage import AtomicFile, exists, is_url, join, listdir, open_input, remove

METADATA_KEY = b"esm2cli"
ROW_GROUP_BYTES = 32 << 20  # a row group is flushed past this much buffered embedding data


@dataclass
class Rows:
    """Embedded sequences ready to be written, in output order."""

    ids: list[str]
    descriptions: list[str]
    lengths: list[int]
    truncated: list[bool]
    pooled: dict[int, np.ndarray]
    per_token: dict[int, list[np.ndarray]]

    def __len__(self) -> int:
        return len(self.ids)


def embedding_columns(layers: Sequence[int], prefix: str) -> dict[int, str]:
    """Column name per layer: ``prefix`` alone for one layer, ``prefix_l<layer>`` for several."""
    if len(layers) == 1:
        return {layers[0]: prefix}
    return {layer: f"{prefix}_l{layer}" for layer in layers}


def build_schema(hidden: int, layers: Sequence[int], per_token: bool, metadata: dict) -> pa.Schema:
    """The output schema, with the run's metadata (model, layers, pooling, dtype, version) attached."""
    vector = pa.list_(pa.float32(), hidden)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("description", pa.string(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
    fields += [pa.field(name, vector, nullable=False) for name in embedding_columns(layers, "embedding").values()]
    if per_token:
        fields += [
            pa.field(name, pa.list_(vector), nullable=False) for name in embedding_columns(layers, "per_token").values()
        ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def read_metadata(path: str | os.PathLike) -> dict:
    """The esm2cli metadata of a Parquet file written by esm2cli ({} for any other file)."""
    try:
        with open_input(path) as handle:
            metadata = pq.read_schema(handle).metadata or {}
        return json.loads(metadata.get(METADATA_KEY, b"{}"))
    except (pa.ArrowInvalid, ValueError):
        return {}


def _vectors(matrix: np.ndarray, hidden: int) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, hidden)


def _token_lists(arrays: list[np.ndarray], hidden: int) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    stacked = np.concatenate(arrays) if arrays else np.zeros((0, hidden), np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), _vectors(stacked, hidden))


class EmbeddingWriter:
    """Streams rows to a file in row groups; the file appears at ``path`` only on commit.

    A crash or an abort leaves no file at ``path``: what is there is always complete.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, hidden: int, layers: Sequence[int]):
        self.path = str(path)
        self.schema = schema
        self.hidden = hidden
        self.pooled_cols = embedding_columns(layers, "embedding")
        self.token_cols = embedding_columns(layers, "per_token")
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_bytes = 0
        self._file = AtomicFile(self.path)
        self._writer = pq.ParquetWriter(self._file.handle, schema, compression="zstd")

    def write(self, rows: Rows) -> None:
        """Adds rows; a row group is written once enough data is buffered."""
        if not len(rows):
            return
        columns = {
            "id": pa.array(rows.ids, pa.string()),
            "description": pa.array(rows.descriptions, pa.string()),
            "length": pa.array(rows.lengths, pa.int32()),
            "truncated": pa.array(rows.truncated, pa.bool_()),
        }
        for layer, name in self.pooled_cols.items():
            columns[name] = _vectors(rows.pooled[layer], self.hidden)
        if rows.per_token:
            for layer, name in self.token_cols.items():
                columns[name] = _token_lists(rows.per_token[layer], self.hidden)
        batch = pa.RecordBatch.from_pydict(columns, schema=self.schema)
        self._buffer.append(batch)
        self._buffered_bytes += batch.nbytes
        if self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_batches(self._buffer, schema=self.schema))
            self._buffer, self._buffered_bytes = [], 0

    def commit(self) -> None:
        """Writes what is buffered, closes the file and makes it visible at its path."""
        try:
            self._flush()
            self._writer.close()
        except OSError as exc:
            self._file.abort()
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._file.commit()

    def abort(self) -> None:
        """Closes and drops the file; nothing appears at the final path."""
        try:
            self._writer.close()
        finally:
            self._file.abort()


_DONE = object()


class BackgroundWriter:
    """Hands windows of rows to a sink (a ChunkStore) on a thread of its own, overlapping I/O with compute.

    At most ``depth`` windows wait for the thread; write() blocks past that, which bounds memory.
    An error on the thread is raised by the next write(), or by finish().
    """

    def __init__(self, writer, depth: int = 2):
        self.writer = writer
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

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, index: int, rows: Rows) -> None:
        """Queues one window of rows for the writer thread."""
        self._raise_if_failed()
        self._queue.put((index, rows))

    def finish(self) -> None:
        """Waits until every queued window is written."""
        self._queue.put(_DONE)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Drops what is queued, stops the thread and lets the sink clean up."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        self.writer.abort()


CHUNK_MANIFEST = "run.json"


def work_dir(target: str) -> str:
    """Where the finished chunks of a run toward ``target`` are kept until it completes.

    Its name starts with '_' so that dataset readers (pyarrow, and globs of *.parquet) skip it.
    """
    if is_url(target):
        parent, name = target.rsplit("/", 1)
    else:
        parent, name = os.path.split(os.path.abspath(target))
    return join(parent, f"_{name}.parts")


class ChunkStore:
    """The resumable form of one output file: one Parquet file per window of records, then one merge.

    Every chunk is committed atomically, so after an interruption (Ctrl-C, SIGTERM, SIGKILL) the
    finished chunks are intact and a rerun with the same arguments skips them. A manifest records
    the run's arguments so that chunks of a different run are never mixed in.
    """

    def __init__(self, target: str, schema: pa.Schema, hidden: int, layers: Sequence[int], run_key: dict):
        self.target = target
        self.dir = work_dir(target)
        self.schema = schema
        self.hidden = hidden
        self.layers = layers
        self.run_key = run_key

    def chunk_path(self, index: int) -> str:
        return join(self.dir, f"chunk-{index:06d}.parquet")

    def open(self, overwrite: bool) -> set[int]:
        """Prepares the work directory; returns the chunks already finished by an earlier run.

        Raises:
            OutputExistsError: The directory holds chunks of a run with other arguments.
        """
        manifest = join(self.dir, CHUNK_MANIFEST)
        if exists(manifest) and not overwrite:
            with open_input(manifest) as handle:
                earlier = json.load(handle)
            if earlier != self.run_key:
                raise OutputExistsError(
                    f"{self.dir} holds unfinished work of a run with other arguments "
                    "(use --overwrite to discard it, or rerun with the same arguments)"
                )
        else:
            remove(self.dir, recursive=True)
            manifest_file = AtomicFile(manifest)
            manifest_file.handle.write(json.dumps(self.run_key, sort_keys=True).encode())
            manifest_file.commit()
        done = set()
        for name in listdir(self.dir):
            if name.startswith("chunk-") and name.endswith(".parquet"):
                done.add(int(name[len("chunk-") : -len(".parquet")]))
        return done

    def write(self, index: int, rows: Rows) -> None:
        """Writes one chunk and commits it."""
        writer = EmbeddingWriter(self.chunk_path(index), self.schema, self.hidden, self.layers)
        try:
            writer.write(rows)
        except BaseException:
            writer.abort()
            raise
        writer.commit()

    def commit(self, chunks: int, expected_rows: int) -> None:
        """Concatenates chunks 0..chunks-1 into the target, atomically, then deletes the work directory."""
        paths = [self.chunk_path(index) for index in range(chunks)]
        concatenate(paths, self.target, self.schema, expected_rows)
        remove(self.dir, recursive=True)

    def abort(self) -> None:
        """Keeps the finished chunks: a rerun resumes from them."""


_PART = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")


def find_parts(prefix: str) -> list[str]:
    """The part files of a sharded run under a directory or prefix, in shard order.

    Raises:
        OutputError: No parts, parts of different shard counts, or missing shards (named).
    """
    found: dict[int, set[int]] = {}
    for name in listdir(prefix):
        if m := _PART.match(name):
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not found:
        raise OutputError(f"{prefix}: no part-<i>-of-<n>.parquet files")
    if len(found) > 1:
        raise OutputError(f"{prefix}: parts of different shard counts ({', '.join(map(str, sorted(found)))})")
    ((count, indices),) = found.items()
    missing = sorted(set(range(count)) - indices)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise OutputError(f"{prefix}: {len(missing)} of {count} shards are not finished: {shown}")
    return [join(prefix, f"part-{i:05d}-of-{count:05d}.parquet") for i in range(count)]


def concatenate(sources: list[str], target: str, schema: pa.Schema, expected_rows: int | None = None) -> int:
    """Copies the row groups of Parquet files, in order, into one new file that appears atomically.

    Returns:
        The number of rows written.

    Raises:
        OutputError: A source's columns differ from ``schema``, or the rows are not ``expected_rows``.
    """
    out = AtomicFile(target)
    writer = pq.ParquetWriter(out.handle, schema, compression="zstd")
    rows = 0
    try:
        for source_path in sources:
            with open_input(source_path) as handle:
                source = pq.ParquetFile(handle)
                if not source.schema_arrow.remove_metadata().equals(schema.remove_metadata()):
                    raise OutputError(f"{source_path}: its columns differ from those of {sources[0]}")
                for group in range(source.num_row_groups):
                    table = source.read_row_group(group)
                    rows += table.num_rows
                    writer.write_table(table.replace_schema_metadata(schema.metadata))
        writer.close()
        if expected_rows is not None and rows != expected_rows:
            raise OutputError(f"{len(sources)} files hold {rows} rows, expected {expected_rows}; this is a bug")
    except BaseException:
        writer.close()
        out.abort()
        raise
    out.commit()
    return rows


def merge_parts(prefix: str, output: str) -> int:
    """Concatenates every part of a sharded run, in shard order (the input order), into one file.

    Returns:
        The number of rows written.

    Raises:
        OutputError: Parts are missing or inconsistent.
    """
    parts = find_parts(prefix)
    with open_input(parts[0]) as handle:
        schema = pq.read_schema(handle)
    return concatenate(parts, output, schema)
