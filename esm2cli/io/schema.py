"""The columns of an output: the Arrow schema, its metadata and the record batches of rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esm2cli.errors import ConfigError

METADATA_KEY = b"esm2cli"
ROW_GROUP_BYTES = 32 << 20  # embeddings per row group at most: bounds what a reader or the merge holds


@dataclass
class Embeddings:
    """The vectors of some proteins on the host, in a known order: what a batch gives back (float32, from the
    forward, a replica or a modeled card) and what is read back from earlier outputs (--reuse).

    Attributes:
        pooled: Layer -> array of shape (proteins, hidden).
        per_token: Layer -> one (residues, hidden) array per protein; empty unless asked.
        contacts: One (residues, residues) array of contact probabilities per protein; empty unless asked.
    """

    pooled: dict[int, np.ndarray]
    per_token: dict[int, list[np.ndarray]]
    contacts: list[np.ndarray] = field(default_factory=list)

    @staticmethod
    def concat(parts: Sequence[Embeddings]) -> Embeddings:
        """Joins the vectors of consecutive parts, in order (the parts hold the same layers)."""
        pooled = {layer: np.concatenate([p.pooled[layer] for p in parts]) for layer in parts[0].pooled}
        per_token = {layer: [a for p in parts for a in p.per_token[layer]] for layer in parts[0].per_token}
        return Embeddings(pooled, per_token, [a for p in parts for a in p.contacts])


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
    sequence_sha256: list[str] | None = None  # SHA-256 of the residues as embedded, hex (None: unknown, null)

    def __len__(self) -> int:
        return len(self.ids)


def embedding_columns(layers: Sequence[int], prefix: str) -> dict[int, str]:
    """Column name per layer: ``prefix`` alone for one layer, ``prefix_l<layer>`` for several."""
    if len(layers) == 1:
        return {layers[0]: prefix}
    return {layer: f"{prefix}_l{layer}" for layer in layers}


_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


def build_schema(
    hidden: int,
    layers: Sequence[int],
    per_token: bool,
    metadata: dict,
    contacts: bool = False,
    *,
    dtype: str = "float32",
) -> pa.Schema:
    """The output schema, with the run's metadata (model, layers, pooling, dtype, version) attached.

    ``dtype`` is how the vectors are stored: float32, or float16 (Arrow's halffloat, half the bytes); contact
    probabilities stay float32.

    With ``contacts``, a ``contacts`` column holds each protein's L x L contact probabilities as L lists
    of L float32 values (row i: residue i against every residue); ``np.array(value.as_py())`` is the matrix.
    """
    vector = pa.list_(_VALUE_TYPES[dtype], hidden)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("description", pa.string(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("windows", pa.int32(), nullable=False),
        pa.field("sequence_sha256", pa.string()),  # the residues as embedded; what --reuse matches rows by
    ]
    fields += [pa.field(name, vector, nullable=False) for name in embedding_columns(layers, "embedding").values()]
    if per_token:
        fields += [
            pa.field(name, pa.list_(vector), nullable=False) for name in embedding_columns(layers, "per_token").values()
        ]
    if contacts:
        fields.append(pa.field("contacts", pa.list_(pa.list_(pa.float32())), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def vector_dtype(field_type: pa.DataType) -> np.dtype:
    """The numpy dtype of the values of an embedding column (a fixed-size list, or a list of them)."""
    while pa.types.is_list(field_type) or pa.types.is_fixed_size_list(field_type):
        field_type = field_type.value_type
    return np.dtype(field_type.to_pandas_dtype())


_FLOAT32 = np.dtype(np.float32)


def _leaves(field: pa.Field, prefix: str = "") -> list[tuple[str, pa.DataType]]:
    """The Parquet column paths under an Arrow field, with their leaf types.

    A list's values are ``<name>.list.element`` in Parquet (its compliant nested type), whatever the Arrow
    value field is called.
    """
    path = prefix + field.name
    if pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type):
        return _leaves(field.type.value_field.with_name("element"), f"{path}.list.")
    return [(path, field.type)]


# Every page carries a CRC: a flipped byte in stored vectors is found when the file is read again (resume, merge,
# --reuse), never copied on as numbers.
WRITE_OPTIONS = {"compression": "zstd", "write_page_checksum": True}


def write_options(schema: pa.Schema) -> dict:
    """ParquetWriter options for every output (embeddings, scores, merged parts): WRITE_OPTIONS (zstd, page
    checksums); floats split by byte, never dictionary-encoded.

    Parquet's writer dictionary-encodes a column until its dictionary passes a page limit, but checks that
    limit only between rows: one protein's per-token list (35,000 residues x 320 float32, 45 MB) went whole
    into a dictionary of 11 million distinct values, 1.5 GB of hash table, before falling back to plain.
    Float embeddings have no repeated values to share (bf16 ones have at most 65,536, which byte-split zstd
    packs as well: 15 MB against 17 MB dictionary-encoded for that protein), so they are written
    BYTE_STREAM_SPLIT, which every Parquet reader since format 2.8 decodes.
    """
    leaves = [leaf for field in schema for leaf in _leaves(field)]
    floats = [path for path, kind in leaves if pa.types.is_floating(kind)]
    return {
        **WRITE_OPTIONS,
        "use_dictionary": [path for path, kind in leaves if not pa.types.is_floating(kind)],
        "use_byte_stream_split": floats,
    }


def _in_range(matrix: np.ndarray, dtype: np.dtype, ids: Sequence[str], column: str) -> np.ndarray:
    """``matrix`` cast to ``dtype``, refused where a finite value would become inf (float16 ends at 65504).

    Raises:
        ConfigError: A value is beyond the stored type's range (the record and column named).
    """
    values = np.asarray(matrix)
    with np.errstate(over="ignore"):  # an overflow is refused below, naming the record
        cast = values.astype(dtype, copy=False)
    if dtype == _FLOAT32:
        return cast
    overflow = np.isinf(cast) & np.isfinite(values)
    if overflow.any():
        row = int(np.argwhere(overflow)[0][0]) if len(ids) > 1 else 0  # one id: per-token rows are residues
        peak = float(np.abs(values[overflow]).max())
        raise ConfigError(
            f"{ids[row]}: {column} holds {peak:.4g}, beyond {dtype.name}'s range (65504): "
            "use --output-dtype float32 to store it"
        )
    return cast


def _vectors(matrix: np.ndarray, hidden: int, dtype: np.dtype = _FLOAT32) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(matrix, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, hidden)


def _token_lists(arrays: list[np.ndarray], hidden: int, dtype: np.dtype = _FLOAT32) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    stacked = np.concatenate(arrays) if arrays else np.zeros((0, hidden), np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), _vectors(stacked, hidden, dtype))


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
        "sequence_sha256": pa.array(
            rows.sequence_sha256[start:stop] if rows.sequence_sha256 else [None] * (stop - start), pa.string()
        ),
    }
    for layer, name in embedding_columns(layers, "embedding").items():
        dtype = vector_dtype(schema.field(name).type)
        matrix = _in_range(rows.pooled[layer][start:stop], dtype, rows.ids[start:stop], name)
        columns[name] = _vectors(matrix, hidden, dtype)
    if rows.per_token:
        for layer, name in embedding_columns(layers, "per_token").items():
            dtype = vector_dtype(schema.field(name).type)
            arrays = rows.per_token[layer][start:stop]
            arrays = [_in_range(a, dtype, [i], name) for i, a in zip(rows.ids[start:stop], arrays, strict=True)]
            columns[name] = _token_lists(arrays, hidden, dtype)
    if rows.contacts is not None:
        columns["contacts"] = _contact_lists(rows.contacts[start:stop])
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def as_metadata(value: object) -> dict:
    """Metadata as esm2cli writes it, or {}: JSON under our key that is not an object (with an object as its
    identity) was written by something else, and is treated as no metadata at all."""
    if not isinstance(value, dict) or not isinstance(value.get("identity", {}), dict):
        return {}
    return value


def open_parquet(handle) -> pq.ParquetFile:
    """A Parquet file whose pages are checked against their checksums as they are read (see read_checked)."""
    return pq.ParquetFile(handle, page_checksum_verification=True)


def is_damage(exc: BaseException) -> bool:
    """True for the error pyarrow raises on a page whose checksum does not match."""
    return isinstance(exc, OSError) and "checksum" in str(exc).lower()
