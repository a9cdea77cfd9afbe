"""Earlier outputs as a source of rows (``--reuse``): an index of their rows by sequence hash, and row reads.

A row of an earlier output may stand for a new run's row when its ``sequence_sha256`` (the residues as
embedded: after truncation, or the whole protein in window mode) is the new record's and the file's
numbers identity (weights, dtype, layers, pooling, ...; see identity.numbers_identity) is the run's.
Only hashes are held in memory (24 bytes a row, the first 16 bytes of each digest and the row's place),
never vectors: rows are read when a chunk needs them, a row group at a time, through a cache bounded in
bytes. A read row's full hash is compared with the one asked for, so a prefix collision or a file
replaced during the run cannot slip a wrong row in.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esm2cli.config import EmbedConfig
from esm2cli.errors import ConfigError, DamagedFileError, OutputError
from esm2cli.io.identity import numbers_identity
from esm2cli.io.schema import Embeddings, embedding_columns
from esm2cli.io.storage import exists, file_stamp, is_stream, is_url, join, listdir, open_input

log = logging.getLogger(__name__)

HASH_COLUMN = "sequence_sha256"
OUTPUT_SUFFIXES = (".parquet", ".h5", ".hdf5")
CACHE_BYTES = 96 << 20  # decoded row groups kept for the chunks that follow: two of 32 MB and slack
_ROW_BITS = 40  # a row's place: file index above these bits, row below (a trillion rows a file)
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def embedded_sequence(sequence: str, embed: EmbedConfig) -> str:
    """The residues a row's numbers come from: the whole protein in window mode, else its first ``truncate``."""
    return sequence if embed.long_sequences == "window" else sequence[: embed.truncate]


def sequence_sha256(sequence: str) -> str:
    """The ``sequence_sha256`` of residues: SHA-256 of their one-letter codes (ASCII), in hex.

    The same as ``printf %s SEQUENCE | sha256sum``.
    """
    return hashlib.sha256(sequence.encode("ascii", "replace")).hexdigest()


def _keys(hashes: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first 16 bytes of hex digests as two big-endian uint64 (hi, lo), and which ones are valid digests."""
    if isinstance(hashes, pa.ChunkedArray):
        hashes = hashes.combine_chunks()
    hashes = hashes.cast(pa.string())
    valid = pc.and_(pc.is_valid(hashes), pc.equal(pc.utf8_length(hashes), 64)).fill_null(False)
    filled = pc.if_else(valid, hashes, pa.scalar("0" * 64))
    valid = np.asarray(valid, dtype=bool).copy()
    n = len(filled)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), valid
    offsets = np.frombuffer(filled.buffers()[1], np.int32)[filled.offset : filled.offset + n + 1]
    data = np.frombuffer(filled.buffers()[2], np.uint8)
    chars = data[offsets[0] : offsets[-1]].reshape(n, 64)[:, :32]
    nibbles = _HEX[chars]
    valid &= (nibbles != 255).all(axis=1)
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    words = np.ascontiguousarray(packed).view(">u8").astype(np.uint64)
    return words[:, 0].copy(), words[:, 1].copy(), valid


def expand_sources(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The output files named by ``--reuse``: files as they are, directories and prefixes by their outputs.

    Under a directory or prefix, every .parquet, .h5 and .hdf5 file directly in it counts (the parts of a
    sharded run, say), but for names starting with '.' or '_' (temporary files, work directories).

    Raises:
        ConfigError: A path is a stream, or neither a file nor a directory or prefix holding outputs.
    """
    files: list[str] = []
    for path in map(str, paths):
        if is_stream(path):
            raise ConfigError(
                f"--reuse {path}: a stream (a pipe or FIFO), not a file; an earlier output is read by seeking "
                "(Parquet's footer, HDF5's index): write it to a file first"
            )
        if _is_file(path):
            files.append(path)
            continue
        found = [
            join(path, name)
            for name in listdir(path)
            if name.lower().endswith(OUTPUT_SUFFIXES) and not name.startswith((".", "_"))
        ]
        if not found:
            raise ConfigError(f"--reuse {path}: no such file, nor a directory or prefix holding outputs")
        files += found
    return list(dict.fromkeys(files))


def _is_file(path: str) -> bool:
    if is_url(path):
        return path.lower().endswith(OUTPUT_SUFFIXES) and exists(path)
    return os.path.isfile(path)


def fingerprints(files: Sequence[str]) -> list[dict]:
    """What identifies each file's version (path, size, modification): recorded with a resumable run's chunks."""
    return [{"path": path, **file_stamp(path)} for path in files]


@dataclass(frozen=True)
class Wanted:
    """What the run needs of each row: its layers (as numbers and column names), per-token vectors, contacts."""

    layers: tuple[int, ...]
    hidden: int
    per_token: bool
    contacts: bool

    def columns(self) -> dict[str, tuple[str, int | None]]:
        """Column name -> (kind, layer) of the Parquet columns a row is copied from."""
        cols: dict[str, tuple[str, int | None]] = {
            name: ("pooled", layer) for layer, name in embedding_columns(self.layers, "embedding").items()
        }
        if self.per_token:
            cols |= {name: ("per_token", layer) for layer, name in embedding_columns(self.layers, "per_token").items()}
        if self.contacts:
            cols["contacts"] = ("contacts", None)
        return cols


def _flat(array: pa.Array, hidden: int) -> np.ndarray:
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, hidden)


def _lists(column: pa.Array) -> list[pa.Array]:
    offsets = column.offsets.to_numpy()
    values = column.values
    return [values.slice(offsets[i], offsets[i + 1] - offsets[i]) for i in range(len(column))]


class _ParquetSource:
    """An earlier Parquet output, open for the run: its row groups' hashes, and rows read by number."""

    def __init__(self, path: str, stack: ExitStack, wanted: Wanted):
        from esm2cli.io.parquet import open_parquet

        self.path = path
        self.file = open_parquet(stack.enter_context(open_input(path)))  # every page read is checked
        self.wanted = wanted
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def missing_columns(self) -> list[str]:
        names = set(self.file.schema_arrow.names)
        return [c for c in [HASH_COLUMN, *self.wanted.columns()] if c not in names]

    def widths(self) -> set[int]:
        """The widths of the vectors the run would copy (one, the run's hidden size, when they fit)."""
        schema = self.file.schema_arrow
        found = set()
        for name, (kind, _) in self.wanted.columns().items():
            kind_type = schema.field(name).type
            if kind == "per_token" and pa.types.is_list(kind_type):
                kind_type = kind_type.value_type
            if kind != "contacts" and pa.types.is_fixed_size_list(kind_type):
                found.add(kind_type.list_size)
        return found

    def hashes(self) -> Iterator[tuple[int, pa.Array]]:
        """(first row, hash column) of each row group.

        Raises:
            DamagedFileError: A page fails its checksum.
        """
        for group in range(self.file.num_row_groups):
            yield int(self.starts[group]), self._read(group, [HASH_COLUMN]).column(0)

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def read_group(self, group: int) -> pa.Table:
        """A row group's hashes and vectors.

        Raises:
            DamagedFileError: A page fails its checksum (the file was damaged after it was written).
        """
        return self._read(group, [HASH_COLUMN, *self.wanted.columns()])

    def _read(self, group: int, columns: list[str]) -> pa.Table:
        from esm2cli.io.parquet import is_damage

        try:
            return self.file.read_row_group(group, columns=columns)
        except OSError as exc:
            if is_damage(exc):
                raise DamagedFileError(self.path) from exc
            raise

    def take(self, table: pa.Table, rows: np.ndarray) -> tuple[list[str], Embeddings]:
        """Rows of a decoded row group (numbers within the group): their hashes and vectors."""
        part = table.take(pa.array(rows, pa.int64())).combine_chunks()
        hidden = self.wanted.hidden
        pooled: dict[int, np.ndarray] = {}
        per_token: dict[int, list[np.ndarray]] = {}
        contacts: list[np.ndarray] = []
        for name, (kind, found) in self.wanted.columns().items():
            column = part.column(name).chunk(0) if part.num_rows else part.column(name).combine_chunks()
            layer = int(found) if found is not None else -1  # contacts have no layer
            if kind == "pooled":
                pooled[layer] = _flat(column, hidden)
            elif kind == "per_token":
                per_token[layer] = [_flat(v, hidden) if len(v) else np.zeros((0, hidden), np.float32)
                                    for v in _lists(column)]  # fmt: skip
            else:
                contacts = [_flat(v, len(v)) if len(v) else np.zeros((0, 0), np.float32) for v in _lists(column)]
        return part.column(HASH_COLUMN).to_pylist(), Embeddings(pooled, per_token, contacts)


class _Hdf5Source:
    """An earlier HDF5 output: one dataset per protein, its hash in the ``sequence_sha256`` attribute."""

    def __init__(self, path: str, stack: ExitStack, wanted: Wanted):
        from esm2cli.io import hdf5

        self.path = path
        self.file = stack.enter_context(hdf5.require().File(stack.enter_context(open_input(path)), "r"))
        self.wanted = wanted
        self.keys = [k for k in self.file if k != hdf5.PER_TOKEN_GROUP]

    def missing_columns(self) -> list[str]:
        if self.wanted.contacts:
            return ["contacts"]  # an HDF5 output keeps no contact maps
        if self.keys and HASH_COLUMN not in self.file[self.keys[0]].attrs:
            return [HASH_COLUMN]
        return []

    def widths(self) -> set[int]:
        """The widths of its vectors (the last axis of its first dataset)."""
        return {int(self.file[self.keys[0]].shape[-1])} if self.keys else set()

    def hashes(self) -> Iterator[tuple[int, pa.Array]]:
        found = [self.file[k].attrs.get(HASH_COLUMN) for k in self.keys]
        yield 0, pa.array([h.decode() if isinstance(h, bytes) else h for h in found], pa.string())

    def take_rows(self, rows: np.ndarray) -> tuple[list[str], Embeddings]:
        from esm2cli.io import hdf5

        several = len(self.wanted.layers) > 1
        hashes, pooled_rows, token_rows = [], [], []
        for row in rows:
            dataset = self.file[self.keys[row]]
            found = dataset.attrs.get(HASH_COLUMN)
            hashes.append(found.decode() if isinstance(found, bytes) else found)
            data = np.asarray(dataset[()], np.float32)
            pooled_rows.append(data if several else data[None])
            if self.wanted.per_token:
                tokens = np.asarray(self.file[hdf5.PER_TOKEN_GROUP][self.keys[row]][()], np.float32)
                token_rows.append(tokens if several else tokens[None])
        pooled = {layer: np.stack([p[i] for p in pooled_rows]) for i, layer in enumerate(self.wanted.layers)}
        per_token = (
            {layer: [t[i] for t in token_rows] for i, layer in enumerate(self.wanted.layers)}
            if self.wanted.per_token
            else {}
        )
        return hashes, Embeddings(pooled, per_token, [])


class ReuseIndex:
    """The rows of earlier outputs that a run may copy, by sequence hash; open for the run (close() it).

    Args:
        files: Output files (expand_sources'), in priority order: a hash found in several files is
            taken from the first.
        identity: The run's identity; a file whose numbers identity differs is not used (one log line says why).
        wanted: The layers and columns the run writes.
    """

    def __init__(self, files: Sequence[str], identity: dict, wanted: Wanted):
        self.wanted = wanted
        self.sources: list[_ParquetSource | _Hdf5Source] = []
        self.counts: dict[str, int] = {}
        self._stack = ExitStack()
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._rejected: set[int] = set()  # files found out of step with their sequences (reject)
        self._cached_bytes = 0
        his, los, locs = [], [], []
        want = numbers_identity(identity)
        try:
            for path in files:
                source = self._open(path, want)
                keys = self._keys(source, len(self.sources)) if source is not None else None
                if source is None or keys is None:
                    continue
                self.sources.append(source)
                self.counts[path] = 0
                his += keys[0]
                los += keys[1]
                locs += keys[2]
        except BaseException:
            self._stack.close()
            raise
        self._hi, self._lo, self._loc = _sorted_unique(his, los, locs)

    def _open(self, path: str, want: dict) -> _ParquetSource | _Hdf5Source | None:
        """An earlier output open for the run, or None (one line says why) when its rows cannot stand for this run's."""
        from esm2cli.io import hdf5
        from esm2cli.io.parquet import read_metadata

        found = read_metadata(path).get("identity")
        if not found:
            log.warning("not reused: %s is not an esm2cli output", path)
            return None
        if (theirs := numbers_identity(found)) != want:
            log.warning("not reused: %s was made with %s", path, _differences(theirs, want))
            return None
        kind = _Hdf5Source if hdf5.is_hdf5(path) else _ParquetSource
        source = kind(path, self._stack, self.wanted)
        if missing := source.missing_columns():
            log.warning("not reused: %s has no %s column (written before reuse existed, or as HDF5)",
                        path, ", ".join(missing))  # fmt: skip
            return None
        if (widths := source.widths()) - {self.wanted.hidden}:
            # Equal identities and other widths: a file named by a path rather than its architecture, say.
            log.warning("not reused: %s holds vectors %s wide (this run: %d)", path,
                        " and ".join(map(str, sorted(widths))), self.wanted.hidden)  # fmt: skip
            return None
        return source

    def _keys(self, source: _ParquetSource | _Hdf5Source, index: int) -> tuple[list, list, list] | None:
        """The index entries of one source's rows (hash halves, locations); None when its hashes are damaged."""
        his, los, locs = [], [], []
        try:
            for first, column in source.hashes():
                hi, lo, valid = _keys(column)
                rows = np.arange(first, first + len(column), dtype=np.int64)[valid]
                his.append(hi[valid])
                los.append(lo[valid])
                locs.append(rows | np.int64(index << _ROW_BITS))
        except DamagedFileError as exc:
            log.warning("not reused: %s", exc)
            return None
        return his, los, locs

    def __len__(self) -> int:
        return len(self._hi)

    def close(self) -> None:
        self._cache.clear()
        self._stack.close()

    def lookup(self, hashes: Sequence[str]) -> np.ndarray:
        """Each hash's place in the earlier outputs, or -1 where none holds it."""
        out = np.full(len(hashes), -1, dtype=np.int64)
        if not len(self._hi) or not len(hashes):
            return out
        hi, lo, valid = _keys(pa.array(hashes, pa.string()))
        left = np.searchsorted(self._hi, hi, side="left")
        right = np.searchsorted(self._hi, hi, side="right")
        for i in np.nonzero(valid & (right > left))[0]:  # (hi, lo) sorted: the run of equal hi is sorted by lo
            j = left[i] + np.searchsorted(self._lo[left[i] : right[i]], lo[i])
            if j < right[i] and self._lo[j] == lo[i]:
                out[i] = self._loc[j]
        if self._rejected:
            out[np.isin(out >> _ROW_BITS, list(self._rejected)) & (out >= 0)] = -1
        return out

    def file_of(self, loc: int) -> str:
        """The path of the earlier output that holds the row at ``loc`` (lookup's)."""
        return self.sources[int(loc) >> _ROW_BITS].path

    def reject(self, loc: int) -> None:
        """Copies nothing more from the file holding ``loc``: lookup and holds no longer find its rows."""
        self._rejected.add(int(loc) >> _ROW_BITS)

    def place(self, digest: str) -> int:
        """lookup's place of the row of this hex digest, or -1 (one record; lookup() for many)."""
        raw = bytes.fromhex(digest[:32])
        hi, lo = np.uint64(int.from_bytes(raw[:8], "big")), np.uint64(int.from_bytes(raw[8:], "big"))
        i = int(np.searchsorted(self._hi, hi))
        while i < len(self._hi) and self._hi[i] == hi:
            if self._lo[i] == lo:
                loc = int(self._loc[i])
                return -1 if loc >> _ROW_BITS in self._rejected else loc
            i += 1
        return -1

    def read(self, locs: np.ndarray, hashes: Sequence[str], *, count: bool = True) -> Embeddings:
        """The vectors of rows at ``locs`` (lookup's), in that order; each row's hash is checked.

        ``count``: add the rows to the copies counted by file (False for a row read only to be checked).

        Raises:
            OutputError: A row no longer holds the sequence it held when the index was built.
        """
        order = np.argsort(locs, kind="stable")  # file by file, row groups in order: each decoded once
        got: list[tuple[int, list[str], Embeddings]] = []  # (first position in ``order``, hashes, vectors)
        files = locs[order] >> _ROW_BITS
        rows = locs[order] & ((1 << _ROW_BITS) - 1)
        start = 0
        while start < len(order):
            f = int(files[start])
            stop = start + int(np.searchsorted(files[start:], f, side="right"))
            got += self._read_file(f, rows[start:stop], start)
            start = stop
        vectors = _concat([v for _, _, v in got], self.wanted)
        found = [h for _, hs, _ in got for h in hs]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        vectors = _take(vectors, inverse)
        found = [found[i] for i in inverse]
        for i, (want, have) in enumerate(zip(hashes, found, strict=True)):
            if want != have:
                source = self.sources[int(locs[i] >> _ROW_BITS)].path
                raise OutputError(f"{source} changed while this run read it (a row's sequence differs): rerun")
        for f in np.asarray(locs >> _ROW_BITS) if count else ():
            self.counts[self.sources[int(f)].path] += 1
        return vectors

    def _read_file(self, f: int, rows: np.ndarray, first: int) -> list[tuple[int, list[str], Embeddings]]:
        source = self.sources[f]
        if isinstance(source, _Hdf5Source):
            try:
                return [(first, *source.take_rows(rows))]
            except OSError as exc:  # h5py's error for a dataset whose checksum fails, found only now
                raise ConfigError(
                    f"--reuse: {source.path} is damaged (a dataset fails its checksum: {exc}): run again without it, "
                    "with --overwrite"
                ) from exc
        groups = source.group_of(rows)
        out, start = [], 0
        while start < len(rows):
            g = int(groups[start])
            stop = start + int(np.searchsorted(groups[start:], g, side="right"))
            table = self._group(f, g)
            out.append((first + start, *source.take(table, rows[start:stop] - source.starts[g])))
            start = stop
        return out

    def _group(self, f: int, g: int) -> pa.Table:
        """A decoded row group, from the cache when it is there (least recently used ones leave first)."""
        key = (f, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        source = self.sources[f]
        if not isinstance(source, _ParquetSource):
            raise AssertionError("row groups are Parquet's; this is a bug")
        try:
            table = source.read_group(g)
        except DamagedFileError as exc:  # found only now: its rows were planned as copies
            raise ConfigError(f"--reuse: {exc}: run again without it, with --overwrite") from exc
        self._cache[key] = table
        self._cached_bytes += table.nbytes
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.nbytes
        return table


def _differences(theirs: dict, want: dict) -> str:
    """'pooling 'bos' (this run: 'mean'); other weights': how an earlier output's numbers identity differs."""
    out = []
    for key in sorted(set(theirs) | set(want)):
        if theirs.get(key) != want.get(key):
            if key == "model_identity":
                out.append("other weights")
            else:
                out.append(f"{key} {theirs.get(key)!r} (this run: {want.get(key)!r})")
    return "; ".join(out)


def _sorted_unique(his: list, los: list, locs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index sorted by (hi, lo), the first place of each hash kept (files in priority order)."""
    if not his:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
    hi, lo, loc = np.concatenate(his), np.concatenate(los), np.concatenate(locs)
    for parts in (his, los, locs):
        parts.clear()
    order = np.lexsort((loc, lo, hi))
    hi, lo, loc = hi[order], lo[order], loc[order]
    del order
    keep = np.ones(len(hi), dtype=bool)
    keep[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    return hi[keep], lo[keep], loc[keep]


def _concat(parts: list[Embeddings], wanted: Wanted) -> Embeddings:
    pooled = {layer: np.concatenate([p.pooled[layer] for p in parts]) for layer in wanted.layers}
    per_token = (
        {layer: [a for p in parts for a in p.per_token[layer]] for layer in wanted.layers} if wanted.per_token else {}
    )
    contacts = [a for p in parts for a in p.contacts] if wanted.contacts else []
    return Embeddings(pooled, per_token, contacts)


def _take(vectors: Embeddings, index: np.ndarray) -> Embeddings:
    return Embeddings(
        {layer: m[index] for layer, m in vectors.pooled.items()},
        {layer: [arrays[i] for i in index] for layer, arrays in vectors.per_token.items()},
        [vectors.contacts[i] for i in index] if vectors.contacts else [],
    )
