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

from esm2cli.errors import OutputError, OutputExistsError, PartsError
from esm2cli.storage import AtomicFile, exists, is_url, join, listdir, open_input, remove

METADATA_KEY = b"esm2cli"
ROW_GROUP_BYTES = 32 << 20  # embeddings per row group at most: bounds what a reader or the merge holds


@dataclass
class Rows:
    """Embedded sequences ready to be written, in output order."""

    ids: list[str]
    descriptions: list[str]
    lengths: list[int]
    truncated: list[bool]
    pooled: dict[int, np.ndarray]
    per_token: dict[int, list[np.ndarray]]
    windows: list[int] | None = None  # windows each protein was embedded in (None: one each)
    contacts: list[np.ndarray] | None = None  # (residues, residues) contact probabilities, with --contacts

    def __len__(self) -> int:
        return len(self.ids)


def embedding_columns(layers: Sequence[int], prefix: str) -> dict[int, str]:
    """Column name per layer: ``prefix`` alone for one layer, ``prefix_l<layer>`` for several."""
    if len(layers) == 1:
        return {layers[0]: prefix}
    return {layer: f"{prefix}_l{layer}" for layer in layers}


def build_schema(
    hidden: int, layers: Sequence[int], per_token: bool, metadata: dict, contacts: bool = False
) -> pa.Schema:
    """The output schema, with the run's metadata (model, layers, pooling, dtype, version) attached.

    With ``contacts``, a ``contacts`` column holds each protein's L x L contact probabilities as L lists
    of L float32 values (row i: residue i against every residue); ``np.array(value.as_py())`` is the matrix.
    """
    vector = pa.list_(pa.float32(), hidden)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("description", pa.string(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("windows", pa.int32(), nullable=False),
    ]
    fields += [pa.field(name, vector, nullable=False) for name in embedding_columns(layers, "embedding").values()]
    if per_token:
        fields += [
            pa.field(name, pa.list_(vector), nullable=False) for name in embedding_columns(layers, "per_token").values()
        ]
    if contacts:
        fields.append(pa.field("contacts", pa.list_(pa.list_(pa.float32())), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def read_metadata(path: str | os.PathLike) -> dict:
    """The esm2cli metadata of a Parquet (or HDF5) file written by esm2cli ({} for any other file)."""
    from esm2cli import hdf5

    if hdf5.is_hdf5(path):
        return hdf5.read_metadata(path)
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


def _contact_lists(maps: list[np.ndarray]) -> pa.Array:
    """(L, L) matrices as list<list<float32>>: L rows of L values each."""
    sizes = np.array([len(m) for m in maps], dtype=np.int64)
    outer = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    inner = np.concatenate([[0], np.cumsum(np.repeat(sizes, sizes))]).astype(np.int32)
    flat = np.concatenate([m.reshape(-1) for m in maps]) if maps else np.zeros(0, np.float32)
    rows = pa.ListArray.from_arrays(pa.array(inner), pa.array(flat.astype(np.float32, copy=False)))
    return pa.ListArray.from_arrays(pa.array(outer), rows)


def _slices(rows: Rows, hidden: int, limit: int) -> list[tuple[int, int]]:
    """Cuts rows into runs of at most ``limit`` bytes of embeddings (at least one row each)."""
    per_row = [4 * hidden * len(rows.pooled)] * len(rows)
    for arrays in [*rows.per_token.values(), rows.contacts or []]:
        for i, array in enumerate(arrays):
            per_row[i] += array.nbytes
    cuts, start, size = [], 0, 0
    for i, nbytes in enumerate(per_row):
        if i > start and size + nbytes > limit:
            cuts.append((start, i))
            start, size = i, 0
        size += nbytes
    return cuts + [(start, len(rows))] if len(rows) else cuts


def _os_error(path: str, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


def record_batch(
    rows: Rows, schema: pa.Schema, hidden: int, layers: Sequence[int], start: int = 0, stop: int | None = None
) -> pa.RecordBatch:
    """Rows ``start:stop`` as an Arrow record batch of ``schema`` (build_schema's for these layers)."""
    stop = len(rows) if stop is None else stop
    columns = {
        "id": pa.array(rows.ids[start:stop], pa.string()),
        "description": pa.array(rows.descriptions[start:stop], pa.string()),
        "length": pa.array(rows.lengths[start:stop], pa.int32()),
        "truncated": pa.array(rows.truncated[start:stop], pa.bool_()),
        "windows": pa.array(rows.windows[start:stop] if rows.windows else [1] * (stop - start), pa.int32()),
    }
    for layer, name in embedding_columns(layers, "embedding").items():
        columns[name] = _vectors(rows.pooled[layer][start:stop], hidden)
    if rows.per_token:
        for layer, name in embedding_columns(layers, "per_token").items():
            columns[name] = _token_lists(rows.per_token[layer][start:stop], hidden)
    if rows.contacts is not None:
        columns["contacts"] = _contact_lists(rows.contacts[start:stop])
    return pa.RecordBatch.from_pydict(columns, schema=schema)


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
            self._writer = pq.ParquetWriter(self._file.handle, schema, compression="zstd")
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


CHUNK_MANIFEST = "run.json"
_CHUNK = re.compile(r"^chunk-(\d{10})-(\d{10})-([0-9a-f]{64})\.parquet$")


def work_dir(target: str) -> str:
    """Where the finished chunks of a run toward ``target`` are kept until it completes.

    Its name starts with '_' so that dataset readers (pyarrow, and globs of *.parquet) skip it.
    """
    if is_url(target):
        parent, name = target.rstrip("/").rsplit("/", 1)
    else:
        parent, name = os.path.split(os.path.abspath(target))
    return join(parent, f"_{name}.parts")


@dataclass(frozen=True)
class Chunk:
    """Records [start, stop) of the input (0-based file positions), committed together, and their hash."""

    start: int
    stop: int
    sha256: str

    @property
    def name(self) -> str:
        return f"chunk-{self.start:010d}-{self.stop:010d}-{self.sha256}.parquet"


class ChunkStore:
    """The resumable form of one output: one Parquet file per chunk of records, then one merge.

    Every chunk is committed atomically and named by the records it covers and their hash, so after
    an interruption (Ctrl-C, SIGTERM, SIGKILL, a full disk) the finished chunks are intact, and a
    rerun reuses a chunk only when the records it covers hash the same now. A manifest records the
    run's options (model identity, dtype, layers, ...): chunks of other options are never mixed in.
    """

    def __init__(self, target: str, schema: pa.Schema, hidden: int, layers: Sequence[int], options: dict):
        self.target = target
        self.dir = work_dir(target)
        self.schema = schema
        self.hidden = hidden
        self.layers = layers
        self.options = options

    def chunk_path(self, chunk: Chunk) -> str:
        return join(self.dir, chunk.name)

    def open(self, overwrite: bool) -> dict[int, Chunk]:
        """Prepares the work directory; returns the chunks an earlier run finished, by start.

        Raises:
            OutputExistsError: The directory holds chunks of a run with other options (named).
        """
        from esm2cli.identity import describe_changes

        manifest = join(self.dir, CHUNK_MANIFEST)
        earlier = None
        if exists(manifest):
            with open_input(manifest) as handle:
                earlier = json.load(handle)
        if earlier != self.options:
            if earlier is not None and not overwrite:
                raise OutputExistsError(
                    f"{self.dir} holds unfinished work of a run with other options "
                    f"({'; '.join(describe_changes(earlier, self.options))}): rerun with those options to "
                    "resume it, or add --overwrite to discard it"
                )
            remove(self.dir, recursive=True)
            manifest_file = AtomicFile(manifest)
            manifest_file.handle.write(json.dumps(self.options, sort_keys=True).encode())
            manifest_file.commit()
        found = {}
        for name in listdir(self.dir):
            if m := _CHUNK.match(name):
                found[int(m.group(1))] = Chunk(int(m.group(1)), int(m.group(2)), m.group(3))
        return found

    def write(self, chunk: Chunk, rows: Rows) -> None:
        """Writes one chunk and commits it."""
        writer = EmbeddingWriter(self.chunk_path(chunk), self.schema, self.hidden, self.layers)
        try:
            writer.write(rows)
        except BaseException:
            writer.abort()
            raise
        writer.commit()

    def discard(self, chunk: Chunk) -> None:
        """Deletes a chunk whose records changed."""
        remove(self.chunk_path(chunk))

    def commit(self, chunks: list[Chunk], expected_rows: int) -> None:
        """Concatenates the chunks in order into the target (replacing it atomically), then drops the work directory.

        Raises:
            OutputError: The chunks do not cover one contiguous range, or hold other than ``expected_rows`` rows.
        """
        for before, after in zip(chunks, chunks[1:], strict=False):
            if before.stop != after.start:
                raise OutputError(f"chunks {before.name} and {after.name} are not contiguous; this is a bug")
        from esm2cli import hdf5

        paths = [self.chunk_path(c) for c in chunks]
        if hdf5.is_hdf5(self.target):  # the same chunks, written into the HDF5 layout
            hdf5.from_parquet(paths, self.target, expected_rows)
        else:
            concatenate(paths, self.target, self.schema, expected_rows)
        remove(self.dir, recursive=True)


_PART = re.compile(r"^part-(\d{5})-of-(\d{5})(\.parquet|\.h5)$")


def find_parts(prefix: str) -> list[str]:
    """The part files of a sharded run under a directory or prefix, in shard order.

    Raises:
        PartsError: No parts, parts of different shard counts, or missing shards (named).
    """
    found: dict[int, set[int]] = {}
    suffixes = set()
    for name in listdir(prefix):
        if m := _PART.match(name):
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
            suffixes.add(m.group(3))
    if not found:
        raise PartsError(f"{prefix}: no part-<i>-of-<n>.parquet (or .h5) files")
    if len(suffixes) > 1:
        raise PartsError(f"{prefix}: both Parquet and HDF5 parts; merge one format at a time")
    if len(found) > 1:
        raise PartsError(f"{prefix}: parts of different shard counts ({', '.join(map(str, sorted(found)))})")
    ((count, indices),) = found.items()
    missing = sorted(set(range(count)) - indices)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise PartsError(f"{prefix}: {len(missing)} of {count} shards are not finished: {shown}")
    (suffix,) = suffixes
    return [join(prefix, f"part-{i:05d}-of-{count:05d}{suffix}") for i in range(count)]


def concatenate(sources: list[str], target: str, schema: pa.Schema, expected_rows: int | None = None) -> int:
    """Copies the row groups of Parquet files, in order, into one new file that appears atomically.

    Returns:
        The number of rows written.

    Raises:
        OutputError: A source's columns differ from ``schema``, or the rows are not ``expected_rows``.
    """
    out = AtomicFile(target)
    try:
        writer = pq.ParquetWriter(out.handle, schema, compression="zstd")
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
                source = pq.ParquetFile(handle)
                if not source.schema_arrow.remove_metadata().equals(schema.remove_metadata()):
                    raise OutputError(f"{source_path}: its columns differ from those of {sources[0]}")
                for group in range(source.num_row_groups):
                    table = source.read_row_group(group).replace_schema_metadata(schema.metadata)
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


def merge_parts(prefix: str, output: str, overwrite: bool = False) -> int | None:
    """Concatenates every part of a sharded run, in shard order (the input order), into one file.

    The parts must come from one run: the same identity (input content, weights, options) but for
    the shard. The merged file records that identity with the shard set to "merged".

    Returns:
        The number of rows written; None when the output already holds this very merge.

    Raises:
        PartsError: Parts are missing, of different shard counts, or of different runs (named).
        OutputExistsError: The output is one of the parts or lies under the prefix, or it holds
            something else and overwrite is False.
    """
    from esm2cli.identity import describe_changes, same_file

    parts = find_parts(prefix)
    if any(same_file(part, output) for part in parts):
        raise OutputExistsError(f"{output} is one of the parts being merged: name a file outside {prefix}")
    _check_merge_output(prefix, output)
    from esm2cli import hdf5

    first = read_metadata(parts[0])
    identity = {**first.get("identity", {}), "shard": "merged"}
    for part in parts[1:]:
        meta = read_metadata(part)
        other = {**meta.get("identity", {}), "shard": "merged"}
        if other != identity:
            changes = "; ".join(describe_changes(identity, other))
            raise PartsError(f"{part} was made by another run than {parts[0]} ({changes}): rerun that shard")
    if exists(output):
        done = read_metadata(output)
        if done.get("identity") == identity:
            return None
        if not overwrite:
            raise OutputExistsError(f"{output} already exists (use --overwrite to replace it)")
    if hdf5.is_hdf5(parts[0]):
        if not hdf5.is_hdf5(output):
            raise PartsError(f"{prefix} holds HDF5 parts: name an .h5 output to merge them")
        return hdf5.merge(parts, output)
    if hdf5.is_hdf5(output):
        return hdf5.from_parquet(parts, output)
    with open_input(parts[0]) as handle:
        schema = pq.read_schema(handle)
    metadata = {**first, "identity": identity, "parts": len(parts)}
    return concatenate(parts, output, schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()}))


def _check_merge_output(prefix: str, output: str) -> None:
    """Refuses an output inside the prefix: readers of the prefix would see every row twice."""
    if is_url(prefix) or is_url(output):
        inside = str(output).startswith(str(prefix).rstrip("/") + "/")
    else:
        directory = os.path.realpath(prefix)
        inside = os.path.commonpath([directory, os.path.realpath(output)]) == directory
    if inside:
        raise OutputExistsError(
            f"{output} lies inside {prefix}: readers of the parts would see its rows twice; name a file outside it"
        )
