"""The pooled vectors of finished esm2cli outputs, read back in bounded memory for search and the map.

Inputs are Parquet or HDF5 outputs, the part folder of a sharded run, or an ``s3://`` prefix. They must all hold
vectors of one identity (model and weights, layer, pooling, truncation or windows, dtype): what a cosine between
two of them means depends on it. Vectors are L2-normalised as they are read, so an inner product is a cosine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from esm2cli.errors import ConfigError, InputError
from esm2cli.io.identity import describe_changes, numbers_identity
from esm2cli.io.parquet import read_metadata
from esm2cli.io.reuse import OUTPUT_SUFFIXES
from esm2cli.io.schema import embedding_columns, is_damage, open_parquet
from esm2cli.io.storage import exists, file_key, is_stream, is_url, join, listdir, open_input

log = logging.getLogger(__name__)

READ_ROWS = 8192  # rows of an HDF5 input read at a time (Parquet inputs are read a row group at a time)
# Keys of a run's identity that do not change its pooled vectors: a per-token run's pooled column is the same.
_NOT_VECTOR_KEYS = ("per_token", "layers")


@dataclass(frozen=True)
class VectorInput:
    """One output file whose vectors are read: where, how many, and what they are."""

    path: str
    rows: int
    hidden: int
    column: str  # the embedding column read (``embedding``, or ``embedding_l<layer>`` of a multi-layer run)
    layer: int
    identity: dict  # the identity of its vectors (see vector_identity)
    metadata: dict  # the file's esm2cli metadata, as written


def total_rows(sources: Sequence[VectorInput]) -> int:
    """The rows (vectors) of all the inputs, in the order they are read."""
    return sum(source.rows for source in sources)


@dataclass
class VectorBatch:
    """Consecutive rows of one input: their annotations and unit vectors (float32, C order)."""

    path: str
    ids: list[str]
    descriptions: list[str]
    lengths: np.ndarray
    truncated: np.ndarray
    windows: np.ndarray
    sequence_sha256: list[str | None]
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _parts_of(path: str) -> list[str]:
    """The parts of a sharded run, all of one count and every shard finished (PartsError otherwise): a folder of
    unfinished parts would index a part of the proteins without a word."""
    from esm2cli.io.merge import find_parts

    return find_parts(path)


def expand_inputs(paths: Sequence[str | os.PathLike], command: str = "index") -> list[str]:
    """The output files named: files as they are, directories and prefixes by the outputs directly in them.

    Under a directory or prefix every .parquet, .h5 and .hdf5 file counts but those named with a leading '.'
    or '_' (temporaries, work directories), in name order.

    Raises:
        InputError: A path is a stream, missing, or a directory holding no outputs.
    """
    files: list[str] = []
    for path in map(str, paths):
        if is_stream(path):
            raise InputError(f"{command} {path}: a stream, not a file; outputs are read by seeking: save it first")
        if _is_file(path):
            files.append(path)
            continue
        if not exists(path):
            raise InputError(f"{command} {path}: no such file or directory")
        names = [name for name in listdir(path) if name.lower().endswith(OUTPUT_SUFFIXES)]
        if any(name.startswith("part-") for name in names):
            files += _parts_of(path)
            continue
        found = sorted(join(path, name) for name in names if not name.startswith((".", "_")))
        if not found:
            raise InputError(f"{command} {path}: a directory holding no esm2cli output (.parquet, .h5, .hdf5)")
        files += found
    if not files:
        raise InputError(f"{command}: name at least one esm2cli output")
    return _read_once(files)


def _is_file(path: str) -> bool:
    if is_url(path):
        return path.lower().endswith(OUTPUT_SUFFIXES) and exists(path)
    return os.path.isfile(path)


def vector_identity(metadata: dict, layer: int) -> dict:
    """What decides a file's pooled vectors: its numbers identity for the one layer read.

    Two files of one vector identity give a protein the same vector, so their cosines can be compared.
    """
    identity = numbers_identity(metadata.get("identity") or {})
    kept = {key: value for key, value in identity.items() if key not in _NOT_VECTOR_KEYS}
    return {**kept, "layer": layer}


def open_inputs(
    paths: Sequence[str | os.PathLike], *, layer: int | None = None, command: str = "index"
) -> list[VectorInput]:
    """The inputs named, checked to be esm2cli outputs with rows, all of one vector identity.

    Args:
        paths: Files, part folders or prefixes (see expand_inputs).
        layer: The layer to read from a multi-layer run (its number as the run resolved it); None for a run of
            one layer.

    Raises:
        InputError: A file is no esm2cli output, holds no rows, lacks the layer, or its vectors are of another
            identity than the first file's (what differs is named).
    """
    inputs = [_open_input(path, layer, command) for path in expand_inputs(paths, command)]
    first = inputs[0]
    for other in inputs[1:]:
        if other.identity != first.identity or other.hidden != first.hidden:
            changes = "; ".join(describe_changes(first.identity, other.identity)) or "another width"
            raise InputError(f"{other.path}: vectors of another run than {first.path} ({changes})")
    return inputs


def _read_once(files: list[str]) -> list[str]:
    # a file named twice (again, through a link, or as a part beside its folder) is read once, not counted twice
    kept: dict[object, str] = {}
    for path in files:
        key = file_key(path)
        if key in kept:
            also = f" (as {kept[key]})" if kept[key] != path else ""
            log.warning("%s is named more than once%s: it is read once", path, also)
            continue
        kept[key] = path
    return list(kept.values())


def _open_input(path: str, layer: int | None, command: str) -> VectorInput:
    metadata = read_metadata(path)
    if not metadata.get("identity"):
        raise InputError(
            f"{path}: not an esm2cli output (no esm2cli metadata could be read: another file, or a damaged one); "
            f"{command} reads embed's outputs"
        )
    layers = [int(value) for value in metadata.get("layers", [])]
    chosen = _choose_layer(path, layers, layer)
    column = embedding_columns(layers, "embedding")[chosen]
    rows, hidden = _shape(path, column)
    if rows == 0:
        raise InputError(f"{path}: holds no proteins")
    return VectorInput(path, rows, hidden, column, chosen, vector_identity(metadata, chosen), metadata)


def _choose_layer(path: str, layers: list[int], layer: int | None) -> int:
    if not layers:
        raise InputError(f"{path}: its esm2cli metadata names no layers")
    if layer is None:
        if len(layers) > 1:
            raise ConfigError(f"{path} holds layers {layers}: choose one with --layer")
        return layers[0]
    if layer not in layers:
        raise ConfigError(f"{path}: no layer {layer} (it holds layers {layers})")
    return layer


def _shape(path: str, column: str) -> tuple[int, int]:
    from esm2cli.io import hdf5

    with ExitStack() as stack:
        handle = stack.enter_context(open_input(path))
        if hdf5.is_hdf5(path):
            source = stack.enter_context(hdf5.require().File(handle, "r"))
            keys = [k for k in source if k != hdf5.PER_TOKEN_GROUP]
            return len(keys), int(source[keys[0]].shape[-1]) if keys else 0
        parquet = open_parquet(handle)
        field = parquet.schema_arrow.field(column) if column in parquet.schema_arrow.names else None
        if field is None or not pa.types.is_fixed_size_list(field.type):
            raise InputError(f"{path}: no pooled embedding column {column!r}")
        return parquet.metadata.num_rows, field.type.list_size


def read_batches(inputs: Sequence[VectorInput]) -> Iterator[VectorBatch]:
    """The rows of every input in order, a Parquet row group (or READ_ROWS HDF5 datasets) at a time.

    Raises:
        InputError: A page fails its checksum, or a vector holds a NaN or an infinity (the record named).
    """
    from esm2cli.io import hdf5

    for source in inputs:
        reader = _hdf5_batches if hdf5.is_hdf5(source.path) else _parquet_batches
        for batch in reader(source):
            batch.vectors = unit_rows(batch.vectors, batch.ids, source.path)
            yield batch


_ANNOTATIONS = ["id", "description", "length", "truncated", "windows", "sequence_sha256"]


def _parquet_batches(source: VectorInput) -> Iterator[VectorBatch]:
    with open_input(source.path) as handle:
        parquet = open_parquet(handle)
        names = parquet.schema_arrow.names
        columns = [name for name in _ANNOTATIONS if name in names] + [source.column]
        for group in range(parquet.num_row_groups):
            try:
                table = parquet.read_row_group(group, columns=columns)
            except OSError as exc:
                if is_damage(exc):
                    raise InputError(f"{source.path} is damaged (a Parquet page fails its checksum)") from None
                raise
            yield _batch_of(source, table)


def _batch_of(source: VectorInput, table: pa.Table) -> VectorBatch:
    rows = table.num_rows
    names = table.column_names
    vectors = table.column(source.column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return VectorBatch(
        path=source.path,
        ids=table.column("id").to_pylist(),
        descriptions=table.column("description").to_pylist(),
        lengths=table.column("length").to_numpy().astype(np.int32),
        truncated=table.column("truncated").to_numpy(zero_copy_only=False).astype(bool),
        windows=table.column("windows").to_numpy().astype(np.int32) if "windows" in names else np.ones(rows, np.int32),
        sequence_sha256=table.column("sequence_sha256").to_pylist() if "sequence_sha256" in names else [None] * rows,
        vectors=vectors.reshape(rows, source.hidden),
    )


def _hdf5_batches(source: VectorInput) -> Iterator[VectorBatch]:
    from esm2cli.io import hdf5

    with open_input(source.path) as handle, hdf5.require().File(handle, "r") as file:
        keys = [k for k in file if k != hdf5.PER_TOKEN_GROUP]
        layers = [int(value) for value in source.metadata["layers"]]
        for start in range(0, len(keys), READ_ROWS):
            try:
                datasets = [file[key] for key in keys[start : start + READ_ROWS]]
                yield _hdf5_batch(source, datasets, layers.index(source.layer) if len(layers) > 1 else None)
            except OSError:
                raise InputError(f"{source.path} is damaged (a dataset fails its checksum)") from None


def _hdf5_batch(source: VectorInput, datasets: list, layer_row: int | None) -> VectorBatch:
    def attr(dataset, name: str, default=None):
        value = dataset.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    data = [np.asarray(d[()], np.float32) for d in datasets]
    vectors = (
        np.stack([d if layer_row is None else d[layer_row] for d in data]) if data else np.zeros((0, source.hidden))
    )
    return VectorBatch(
        path=source.path,
        ids=[str(attr(d, "original_id")) for d in datasets],
        descriptions=[str(attr(d, "description", "")) for d in datasets],
        lengths=np.array([int(attr(d, "length", 0)) for d in datasets], np.int32),
        truncated=np.array([bool(attr(d, "truncated", False)) for d in datasets], bool),
        windows=np.array([int(attr(d, "windows", 1)) for d in datasets], np.int32),
        sequence_sha256=[attr(d, "sequence_sha256") for d in datasets],
        vectors=vectors.astype(np.float32, copy=False),
    )


def unit_rows(vectors: np.ndarray, ids: Sequence[str], path: str) -> np.ndarray:
    """Each row scaled to length 1 (float32, C order); a zero row stays zero (its cosine with anything is 0).

    Raises:
        InputError: A row holds a NaN or an infinity (the record and the file named).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise InputError(f"{path}: record {ids[int(np.argmax(bad))]!r} has a vector holding NaN or infinity")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    norms[norms == 0] = 1.0
    return (vectors / norms[:, None]).astype(np.float32)
