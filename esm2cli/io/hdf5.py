"""HDF5 output (-o out.h5): one dataset per protein keyed by its id, the layout bio_embeddings users read.

    with h5py.File("out.h5") as f:
        for key, dataset in f.items():              # the "per_token" group holds per-residue arrays
            vector = dataset[()]                      # float32 (hidden,), or (layers, hidden) for several
            dataset.attrs["original_id"], dataset.attrs["length"], dataset.attrs["truncated"]

A run computes into the same resumable Parquet chunks as a Parquet output; only the final commit
differs: the chunks are written into one HDF5 file, beside the target, and renamed over it. Keys are
the ids with '%' and '/' percent-encoded ('/' would nest groups in HDF5), and the names '.' and
'per_token' encoded too; ``original_id`` holds the id verbatim.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esm2cli.errors import ConfigError, DamagedFileError, OutputError
from esm2cli.io.schema import METADATA_KEY, as_metadata, embedding_columns, is_damage, open_parquet
from esm2cli.io.storage import AtomicFile, is_url, open_input

if TYPE_CHECKING:
    from esm2cli.io.fasta import FastaScan

SUFFIXES = (".h5", ".hdf5")
PER_TOKEN_GROUP = "per_token"
INSTALL = "pip install h5py"  # the [h5] extra's one package; esm2cli is installed from a clone, not PyPI
_RESERVED = {".", PER_TOKEN_GROUP}


def is_hdf5(path: str | os.PathLike) -> bool:
    """True when an output path names an HDF5 file (.h5 or .hdf5)."""
    return str(path).lower().endswith(SUFFIXES)


def require():
    """The h5py module.

    Raises:
        ConfigError: h5py is not installed (one line saying how to get it).
    """
    try:
        import h5py
    except ImportError:
        raise ConfigError(f"HDF5 output needs h5py, which is not installed: {INSTALL}") from None
    return h5py


def key_of(record_id: str) -> str:
    """The HDF5 name of a protein: its id with '%' and '/' percent-encoded (and the reserved names)."""
    key = record_id.replace("%", "%25").replace("/", "%2F")
    if key in _RESERVED:
        key = f"%{ord(key[0]):02X}{key[1:]}"
    return key


def id_of(key: str) -> str:
    """The id a key was made from (the inverse of key_of)."""
    from urllib.parse import unquote

    return unquote(key)


def check_run(target: str, scan: FastaScan, *, contacts: bool = False) -> None:
    """Refuses, before any compute, an HDF5 output that cannot be written: no h5py, ids that repeat, or contacts.

    Raises:
        ConfigError: h5py is missing, ids occur more than once (keys must be unique), or contacts are asked for
            (the HDF5 layout has no place for them).
    """
    from esm2cli.io.fasta import describe_duplicates

    if contacts:
        raise ConfigError(f"{target}: --contacts is written to Parquet outputs only: name an .parquet output")
    require()
    if scan.duplicate_ids:
        raise ConfigError(
            f"{target}: HDF5 keys are the ids, and {len(scan.duplicate_ids)} id(s) occur more than once "
            f"(write Parquet to keep them all):\n{describe_duplicates(scan.duplicate_ids)}"
        )


def _metadata(schema: pa.Schema) -> dict:
    return json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))


def _vectors(column: pa.Array, hidden: int) -> np.ndarray:
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, hidden)


def _token_arrays(column: pa.Array, hidden: int) -> list[np.ndarray]:
    offsets = column.offsets.to_numpy()
    flat = _vectors(column.flatten(), hidden)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(column))]


def _stack(arrays: list, several: bool):
    return np.stack(arrays) if several else arrays[0]


def _per_token_group(out):
    if PER_TOKEN_GROUP in out:
        return out[PER_TOKEN_GROUP]
    return out.create_group(PER_TOKEN_GROUP, track_order=True)


def _add_rows(out, batch: pa.RecordBatch, layers: Sequence[int], hidden: int) -> int:
    """Adds one dataset per row of a Parquet record batch (and its per-token datasets)."""
    names = batch.schema.names
    several = len(layers) > 1
    pooled = [_vectors(batch.column(names.index(n)), hidden) for n in embedding_columns(layers, "embedding").values()]
    token_names = list(embedding_columns(layers, "per_token").values())
    tokens = [_token_arrays(batch.column(names.index(n)), hidden) for n in token_names if n in names]
    ids = batch.column(names.index("id")).to_pylist()
    descriptions = batch.column(names.index("description")).to_pylist()
    lengths = batch.column(names.index("length")).to_pylist()
    truncated = batch.column(names.index("truncated")).to_pylist()
    windows = batch.column(names.index("windows")).to_pylist() if "windows" in names else [1] * len(ids)
    hashes = batch.column(names.index("sequence_sha256")).to_pylist() if "sequence_sha256" in names else []
    for row, record_id in enumerate(ids):
        key = key_of(record_id)
        if key in out:
            raise OutputError(f"id {record_id!r} occurs twice; HDF5 keys must be unique")
        dataset = out.create_dataset(key, data=_stack([p[row] for p in pooled], several), fletcher32=True)
        dataset.attrs.update(
            original_id=record_id, description=descriptions[row], length=lengths[row],
            truncated=bool(truncated[row]), windows=windows[row],
        )  # fmt: skip
        if hashes and hashes[row] is not None:
            dataset.attrs["sequence_sha256"] = hashes[row]
        if tokens:
            group = _per_token_group(out)
            residues = group.create_dataset(key, data=_stack([t[row] for t in tokens], several), fletcher32=True)
            residues.attrs["original_id"] = record_id
    return len(ids)


def _set_file_attrs(out, metadata: dict) -> None:
    out.attrs[METADATA_KEY.decode()] = json.dumps(metadata)
    for name in ("model", "model_source", "pooling", "dtype", "truncate", "esm2cli_version"):
        if name in metadata:
            out.attrs[name] = metadata[name]
    if "layers" in metadata:
        out.attrs["layers"] = np.asarray(metadata["layers"], dtype=np.int64)


@contextmanager
def _atomic_hdf5(target: str) -> Iterator[Any]:
    """An h5py File that appears at ``target`` only when the block completes (renamed, or uploaded for a URL)."""
    h5py = require()
    if is_url(target):
        fd, tmp = tempfile.mkstemp(suffix=".h5")
        os.close(fd)
    else:
        directory, name = os.path.split(os.path.abspath(target))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{name}.tmp")
    try:
        # Iteration follows the input order. Every dataset carries a checksum (fletcher32): flipped bytes fail the read
        # (--reuse) rather than be copied on as numbers; HDF5 1.10's format keeps the one-chunk datasets that needs
        # as small as contiguous ones (the 1.8 format adds ~2.8 KB a dataset).
        with h5py.File(tmp, "w", track_order=True, libver=("v110", "latest")) as out:
            yield out
        if is_url(target):
            with AtomicFile(target) as upload, open(tmp, "rb") as handle:
                shutil.copyfileobj(handle, upload.handle, length=8 << 20)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def from_parquet(sources: list[str], target: str, expected_rows: int | None = None) -> int:
    """Writes the rows of Parquet files (chunks, or the parts of a sharded run), in order, into one HDF5 file.

    The file appears at ``target`` atomically, replacing what was there only once it is complete.

    Returns:
        The number of proteins written.

    Raises:
        ConfigError: h5py is missing.
        OutputError: The files hold other than ``expected_rows`` rows, an id repeats, or the file cannot be written.
        DamagedFileError: A page of a source fails its checksum (its ``path`` names the source).
    """
    rows, first = 0, None
    with _atomic_hdf5(target) as out:
        for source in sources:
            with open_input(source) as handle:
                parquet = open_parquet(handle)
                schema = parquet.schema_arrow
                if first is None:
                    first = schema
                    _set_file_attrs(out, _metadata(schema))
                elif not schema.remove_metadata().equals(first.remove_metadata()):
                    raise OutputError(f"{source}: its columns differ from those of {sources[0]}")
                layers, hidden = _metadata(schema)["layers"], _hidden(schema)
                rows += _add_batches(out, parquet, source, layers, hidden)
        if expected_rows is not None and rows != expected_rows:
            raise OutputError(f"{len(sources)} files hold {rows} rows, expected {expected_rows}; this is a bug")
    return rows


def _add_batches(out, parquet: pq.ParquetFile, source: str, layers: Sequence[int], hidden: int) -> int:
    """Adds every row of one Parquet file, its pages checked against their checksums as they are read."""
    rows = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            rows += _add_rows(out, batch, layers, hidden)
    except OSError as exc:
        if is_damage(exc):
            raise DamagedFileError(source) from exc
        raise
    return rows


def _hidden(schema: pa.Schema) -> int:
    return next(f.type.list_size for f in schema if f.name.startswith("embedding"))


def merge(parts: list[str], target: str) -> int:
    """Copies the proteins of HDF5 parts, in shard order, into one HDF5 file (atomically).

    Returns:
        The number of proteins written.

    Raises:
        OutputError: An id occurs in two parts, or the file cannot be written.
    """
    h5py = require()
    rows = 0
    with _atomic_hdf5(target) as out:
        for index, part in enumerate(parts):
            with open_input(part) as handle, h5py.File(handle, "r") as source:
                if index == 0:
                    for name, value in source.attrs.items():
                        out.attrs[name] = value
                for key in source:
                    if key == PER_TOKEN_GROUP:
                        continue
                    if key in out:
                        raise OutputError(f"{part}: id {id_of(key)!r} is also in an earlier part")
                    source.copy(source[key], out, name=key)
                    rows += 1
                if PER_TOKEN_GROUP in source:
                    group = _per_token_group(out)
                    for key in source[PER_TOKEN_GROUP]:
                        source.copy(source[PER_TOKEN_GROUP][key], group, name=key)
    return rows


def read_metadata(path: str | os.PathLike) -> dict:
    """The esm2cli metadata of an HDF5 file written by esm2cli ({} for any other file)."""
    h5py = require()
    try:
        with open_input(path) as handle, h5py.File(handle, "r") as source:
            value = json.loads(source.attrs.get(METADATA_KEY.decode(), "{}"))
    except (OSError, ValueError, TypeError):
        return {}
    return as_metadata(value)
