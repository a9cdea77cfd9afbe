"""Chunks: the committed pieces of a resumable run, and their store beside the output."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from esm2cli.errors import DamagedFileError, OutputError, OutputExistsError
from esm2cli.io.parquet import EmbeddingWriter, concatenate
from esm2cli.io.schema import Rows
from esm2cli.io.storage import AtomicFile, exists, is_url, join, listdir, open_input, remove

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
        from esm2cli.io.identity import describe_changes, recorded

        manifest = join(self.dir, CHUNK_MANIFEST)
        earlier = None
        if exists(manifest):
            with open_input(manifest) as handle:
                earlier = json.load(handle)
        if earlier is None or recorded(earlier) != recorded(self.options):  # (keys added since read as they meant)
            if earlier is not None and not overwrite:
                raise OutputExistsError(
                    f"{self.dir} holds unfinished work of a run with other options "
                    f"({'; '.join(describe_changes(earlier, self.options))}): rerun with those options to "
                    "resume it, or add --overwrite to discard it"
                )
            remove(self.dir, recursive=True)
            with AtomicFile(manifest) as manifest_file:
                manifest_file.handle.write(json.dumps(self.options, sort_keys=True).encode())
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
        from esm2cli.io import hdf5

        paths = [self.chunk_path(c) for c in chunks]
        try:
            if hdf5.is_hdf5(self.target):  # the same chunks, written into the HDF5 layout
                hdf5.from_parquet(paths, self.target, expected_rows)
            else:
                concatenate(paths, self.target, self.schema, expected_rows)
        except DamagedFileError as exc:  # dropped, so that the next run computes it again instead of failing again
            remove(exc.path)
            raise OutputError(f"{exc}: that chunk was removed; run the same command again to recompute it") from exc
        remove(self.dir, recursive=True)
