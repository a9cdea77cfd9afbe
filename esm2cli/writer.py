"""Parquet output: the schema, streamed row groups, and an atomic rename on success."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esm2cli.errors import OutputError

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
    """The esm2cli metadata of a Parquet file written by esm2cli."""
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


def _vectors(matrix: np.ndarray, hidden: int) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, hidden)


def _token_lists(arrays: list[np.ndarray], hidden: int) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    stacked = np.concatenate(arrays) if arrays else np.zeros((0, hidden), np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), _vectors(stacked, hidden))


class EmbeddingWriter:
    """Streams rows to ``<path>.tmp`` in row groups and renames it to ``path`` on commit.

    A crash or an abort leaves no file at ``path``: what is there is always complete.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, hidden: int, layers: Sequence[int]):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.schema = schema
        self.hidden = hidden
        self.pooled_cols = embedding_columns(layers, "embedding")
        self.token_cols = embedding_columns(layers, "per_token")
        self.rows_written = 0
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_bytes = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp_path, schema, compression="zstd")
        except OSError as exc:
            raise OutputError(f"cannot write {self.tmp_path}: {exc.strerror or exc}") from exc

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
        self.rows_written += len(rows)
        if self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_batches(self._buffer, schema=self.schema))
            self._buffer, self._buffered_bytes = [], 0

    def commit(self) -> None:
        """Writes what is buffered, closes the file and renames it into place."""
        try:
            self._flush()
            self._writer.close()
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def abort(self) -> None:
        """Closes and deletes the temporary file; nothing appears at the final path."""
        try:
            self._writer.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


_DONE = object()


class BackgroundWriter:
    """Hands rows to an EmbeddingWriter on a thread of its own, so Parquet encoding overlaps with compute.

    At most ``depth`` row sets wait for the thread; write() blocks past that, which bounds memory.
    An error on the thread is raised by the next write(), or by commit().
    """

    def __init__(self, writer: EmbeddingWriter, depth: int = 2):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="esm2cli-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (rows := self._queue.get()) is not _DONE:
            if self._error is None:
                try:
                    self.writer.write(rows)
                except BaseException as exc:  # reported to the producer on its next call
                    self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, rows: Rows) -> None:
        """Queues rows for the writer thread."""
        self._raise_if_failed()
        self._queue.put(rows)

    def commit(self) -> None:
        """Waits for every queued row, then commits the file."""
        self._queue.put(_DONE)
        self._thread.join()
        self._raise_if_failed()
        self.writer.commit()

    def abort(self) -> None:
        """Drops what is queued, stops the thread and deletes the temporary file."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        self.writer.abort()
