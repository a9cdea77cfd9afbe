"""The Python API: ``Embedder``, for notebooks and scripts; the same engine and numbers as ``esm2cli embed``.

>>> from esm2cli import Embedder
>>> with Embedder("esm2_t12_35M", layers=[6, -1]) as embedder:
...     vectors = embedder.embed(["MKTAYIAKQR", "GSHMLEDPV"])      # {6: (2, 480), 12: (2, 480)}
...     table = embedder.embed_fasta("proteins.fasta")            # a pyarrow.Table, the CLI's columns
"""

from __future__ import annotations

import json
import numbers
import os
import queue
import threading
import typing
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from esm2cli.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MODEL,
    DEFAULT_OUTPUT_DTYPE,
    DEFAULT_WINDOW_OVERLAP,
    LONG_SEQUENCES,
    OUTPUT_DTYPES,
    POOLINGS,
    BatchConfig,
    EmbedConfig,
    InputConfig,
    ModelConfig,
    ShardConfig,
)
from esm2cli.errors import ConfigError, EngineError, InputError
from esm2cli.io.chunks import Chunk
from esm2cli.io.fasta import FastaScan, check_sequence, normalise, read_records, scan_fasta
from esm2cli.io.identity import request_identity, stamp_weights
from esm2cli.io.records import Record
from esm2cli.io.schema import METADATA_KEY, Rows, build_schema, record_batch
from esm2cli.jobs import pipeline
from esm2cli.jobs.reuse import ChunkReuse, open_reuse, reuse_stamps
from esm2cli.model.architecture import resolve_source, resolve_truncate
from esm2cli.runtime.engine import build_engine
from esm2cli.runtime.windows import check_overlap

_DONE = object()


class Embedder:
    """Loads ESM-2 once on every device asked for and embeds sequences or FASTA files.

    Use it as a context manager, or call close() when done: it holds the model on its devices and
    one worker thread per device. One left open is closed when it is garbage-collected or when the
    interpreter exits, so a script that never closes it still ends normally.

    Args:
        model: ESM-2 alias (esm2_t33_650M), hub id, local directory, or fair-esm .pt checkpoint.
        devices: "auto", "cpu", a GPU count, "cuda:0,cuda:1", or "sim:N" (as --devices).
        dtype: "auto", "float32", "bfloat16" or "float16" (as --dtype).
        layers: One layer index or several (0 is the embedding layer, -1 the last). With several,
            results are dicts keyed by layer number (0..num_layers).
        pooling: "mean" over residues, or "bos" (the <cls> token).
        long_sequences: Sequences over ``truncate`` residues: "truncate" (flagged ``truncated``), "window"
            (embedded whole in overlapping windows, as --long-sequences window) or "error" (refused).
        truncate: Residues kept per sequence (the window width in window mode); None: the model's context
            (1,022 residues for ESM-2, 2,046 for ESM C).
        window_overlap: Residues shared by consecutive windows (as --window-overlap).
        per_token: Also compute per-residue vectors (in embed_fasta's tables and files).
        batch_size, max_tokens: Batch bounds (as --batch-size and --max-tokens; None: by device).
        chunk_size: Sequences read, sorted and returned together at most (as --chunk-size); bounds memory.
        load_format: "auto", or "dummy" for random weights of the named size.
        reuse: Earlier outputs (as --reuse: files, directories or prefixes of parts) whose rows, made with
            the same weights and options, embed_fasta and iter_fasta copy instead of computing.
        output_dtype: How the vectors of embed_fasta's and iter_fasta's tables and files are stored:
            "float32", or "float16" (as --output-dtype); embed() and embed_iter() return float32 either way.

    Raises:
        ModelLoadError, DeviceError, ConfigError: The model, devices or options are unusable.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        devices: str = "auto",
        dtype: str = "auto",
        layers: int | Sequence[int] = -1,
        pooling: str = "mean",
        long_sequences: str = "truncate",
        truncate: int | None = None,
        window_overlap: int = DEFAULT_WINDOW_OVERLAP,
        per_token: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_tokens: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        load_format: str = "auto",
        reuse: Sequence[str | os.PathLike] = (),
        output_dtype: str = DEFAULT_OUTPUT_DTYPE,
    ):
        if long_sequences not in LONG_SEQUENCES:
            raise ConfigError(f"long_sequences={long_sequences!r} is not available; use one of {LONG_SEQUENCES}")
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r}: use one of {POOLINGS}")
        if output_dtype not in OUTPUT_DTYPES:
            raise ConfigError(f"output_dtype={output_dtype!r}: use one of {', '.join(OUTPUT_DTYPES)}")
        window = 'long_sequences="window"' if long_sequences != "window" else None
        truncate = resolve_truncate(str(model), truncate, window=window)
        if truncate < 1 or batch_size < 1 or chunk_size < 1:
            raise ConfigError("truncate, batch_size and chunk_size must be at least 1")
        if isinstance(layers, str):  # "6,-1", as --layers takes them
            try:
                layers = [int(part) for part in layers.split(",") if part.strip()]
            except ValueError:
                raise ConfigError(f"layers={layers!r} is not a comma-separated list of integers") from None
        if isinstance(layers, numbers.Integral):
            layer_tuple: tuple[int, ...] = (int(layers),)
        else:
            layer_tuple = tuple(int(x) for x in typing.cast(Sequence[int], layers))
        self._several = len(layer_tuple) > 1
        if not layer_tuple:
            raise ConfigError("name at least one layer")
        self.model_config = ModelConfig(model=str(model), load_format=load_format, dtype=dtype, devices=devices)
        if long_sequences == "window":
            check_overlap(truncate, window_overlap)
        self.embed_config = EmbedConfig(
            layers=layer_tuple, pooling=pooling, per_token=per_token, truncate=truncate,
            long_sequences=long_sequences, window_overlap=window_overlap, output_dtype=output_dtype,
        )  # fmt: skip
        batch = BatchConfig(batch_size=batch_size, max_tokens=max_tokens, chunk_size=chunk_size)
        # The weights are named by the bytes this Embedder loads, not by what the folder holds when it writes.
        stamp = stamp_weights(resolve_source(self.model_config.model), load_format)
        self._setup = build_engine(self.model_config, self.embed_config, batch)
        try:
            self._weights = stamp.confirm(self._setup.model.source, self._setup.model.config.to_dict())
        except BaseException:
            self._setup.engine.close()
            raise
        self._setup.engine.start()
        # Without `with` or close() (a notebook, a short script), the engine is closed when the Embedder
        # is collected or, at the latest, when the interpreter exits.
        self._finalizer = weakref.finalize(self, self._setup.engine.close)
        self.batch_config = self._setup.batch
        self.reuse = [str(path) for path in reuse]

    # What was loaded, for the caller.
    @property
    def layers(self) -> tuple[int, ...]:
        """The layers computed, as numbers 0..num_layers (the keys of dict results)."""
        return self._setup.layers

    @property
    def hidden_size(self) -> int:
        return self._setup.model.hidden_size

    @property
    def devices(self) -> list[str]:
        return [d.name for d in self._setup.devices]

    @property
    def dtype(self) -> str:
        """The dtype the weights run in ("auto" resolved)."""
        return self._setup.dtype

    @property
    def identity(self) -> dict:
        """What decides the numbers of the rows this Embedder computes (io.identity.request_identity): the weights
        it loaded, the dtype and the embedding options. A stored row of an equal identity stands for one of its
        results (the search database checks a query's against its own)."""
        return request_identity(weights=self._weights, dtype=self.dtype, embed=self.embed_config,
                                model_family=self._setup.model.family)  # fmt: skip

    def close(self) -> None:
        """Stops the device workers; the Embedder cannot be used afterwards."""
        self._finalizer()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def embed(self, sequences: str | Iterable[str]) -> np.ndarray | dict[int, np.ndarray]:
        """Embeds sequences held in memory.

        Args:
            sequences: Protein sequences (normalised and checked as FASTA records are); a single
                string is one sequence.

        Returns:
            A float32 array (n, hidden) in input order, or (hidden,) for a single string; a dict
            {layer: array} when several layers were asked.

        Raises:
            InputError: A sequence is empty or holds characters outside the ESM-2 alphabet (named by index);
                or ``sequences`` is neither a string nor an iterable of strings (a dict, bytes, None).
        """
        single = isinstance(sequences, str)
        given = [sequences] if isinstance(sequences, str) else _checked_iterable(sequences)
        records = _records(given, self.embed_config.max_length)
        chunks = [rows.pooled for rows in self._stream(records)]
        result = {
            layer: np.concatenate([c[layer] for c in chunks]) if chunks else np.zeros((0, self.hidden_size), np.float32)
            for layer in self.layers
        }
        if single:
            result = {layer: array[0] for layer, array in result.items()}
        return result if self._several else result[self.layers[0]]

    def embed_iter(self, sequences: Iterable[str]) -> Iterator[np.ndarray | dict[int, np.ndarray]]:
        """Embeds sequences read lazily (a generator, a file being read): one result per chunk of inputs.

        A chunk holds at most ``chunk_size`` sequences (fewer while the first results are due, as the
        CLI's chunks), so inputs of any size stream through. Results come in input order, each an array
        (chunk, hidden), or a dict by layer.

        Raises:
            InputError: A sequence cannot be embedded (named by its index in the input).
        """
        for rows in self._stream(_records(_checked_iterable(sequences), self.embed_config.max_length)):
            yield rows.pooled if self._several else rows.pooled[self.layers[0]]

    def iter_fasta(
        self, fasta: str | os.PathLike, *, skip_invalid: bool = False, allow_duplicate_ids: bool = False
    ) -> Iterator[pa.RecordBatch]:
        """Embeds a FASTA file chunk by chunk: record batches of embed_fasta's table, in file order.

        The file is checked first as the CLI checks it (bad records and duplicate ids stop it
        before any compute, unless skip_invalid / allow_duplicate_ids).

        Raises:
            FastaError: The file is unreadable or holds records that cannot be embedded.
        """
        name = str(fasta)
        inputs = InputConfig(skip_invalid=skip_invalid, allow_duplicate_ids=allow_duplicate_ids)
        max_length = self.embed_config.max_length
        with pipeline.readable_source(name) as source:  # a stream (a FIFO, stdin) is read twice, from a copy
            scan = scan_fasta(source, self.embed_config.truncate, max_length)
            pipeline.check_scan(scan, name, inputs)
            schema = self._schema(name, scan, inputs)
            reuse = self._open_reuse(schema) if self.reuse else None
            try:
                for rows in self._stream(read_records(source, max_length), reuse):  # invalid records get no row
                    yield record_batch(rows, schema, self.hidden_size, self.layers)
            finally:
                if reuse is not None:
                    reuse.close()

    def embed_fasta(
        self,
        fasta: str | os.PathLike,
        output: str | os.PathLike | None = None,
        *,
        skip_invalid: bool = False,
        allow_duplicate_ids: bool = False,
        overwrite: bool = False,
    ) -> pa.Table | pipeline.EmbedSummary:
        """Embeds a FASTA file into a table, or into a file exactly as ``esm2cli embed`` writes it.

        Args:
            fasta: A path or an fsspec URL (s3://...).
            output: None returns a pyarrow.Table; a path (or URL) writes it there as the CLI does
                (atomic, resumable, the same metadata), reusing this Embedder's loaded model.
            skip_invalid, allow_duplicate_ids, overwrite: As the CLI's options.

        Returns:
            The table (id, description, length, truncated, embedding columns); or, with output, the
            run's summary.

        Raises:
            FastaError: Unreadable input or records that cannot be embedded.
            OutputExistsError: The output exists (from another run) and overwrite is False.
        """
        if not self._finalizer.alive:  # before anything is written beside the output
            raise EngineError("this Embedder is closed")
        if output is None:
            batches = list(self.iter_fasta(fasta, skip_invalid=skip_invalid, allow_duplicate_ids=allow_duplicate_ids))
            return pa.Table.from_batches(batches)  # check_scan refuses an input with nothing to embed
        return pipeline.embed_fasta(
            fasta,
            output,
            model=self.model_config,
            embed=self.embed_config,
            batch=self.batch_config,
            inputs=InputConfig(skip_invalid=skip_invalid, allow_duplicate_ids=allow_duplicate_ids),
            overwrite=overwrite,
            setup=self._setup,
            reuse=self.reuse,
            weights=self._weights,
        )

    def _schema(self, source: str, scan: FastaScan, inputs: InputConfig) -> pa.Schema:
        """The schema of the CLI's file for this input, with the same metadata (the run's identity included)."""
        identity = pipeline.run_identity(scan, self._weights, self.dtype, self.embed_config, inputs, ShardConfig(),
                                         family=self._setup.model.family)  # fmt: skip
        model = replace(self.model_config, dtype=self.dtype)
        metadata = pipeline.run_metadata(source, model, self.embed_config, self._setup, identity)
        return build_schema(
            self.hidden_size, self.layers, self.embed_config.per_token, metadata, dtype=self.embed_config.output_dtype
        )

    def _open_reuse(self, schema: pa.Schema) -> ChunkReuse | None:
        """The rows of the earlier outputs (reuse=) that fit the run whose schema (and identity) this is."""
        identity = json.loads(schema.metadata[METADATA_KEY])["identity"]
        files, _ = reuse_stamps(self.reuse)
        return open_reuse(files, identity, self.embed_config, self.layers, self.hidden_size)

    def _stream(self, records: Iterable[Record], reuse: ChunkReuse | None = None) -> Iterator[Rows]:
        """Runs the CLI's embed loop on a thread of its own and yields each chunk's rows as it completes.

        At most two finished chunks wait for the consumer; a consumer that stops early stops the loop.
        """
        if not self._setup.engine.healthy:
            raise EngineError("this Embedder is closed (or a device worker died)")
        chunks: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        class _Sink:
            def discard(self, chunk: Chunk) -> None:  # only runs that resume have earlier chunks
                pass

            def write(self, chunk: Chunk, rows: Rows) -> None:
                while not stop.is_set():
                    try:
                        chunks.put(rows, timeout=0.1)
                        return
                    except queue.Full:
                        continue
                raise _Stopped

        def produce() -> None:
            try:
                pipeline.embed_records(
                    records, self._setup.engine, _Sink(), self.batch_config, self.embed_config, reuse=reuse
                )
            except _Stopped:
                return
            except BaseException as exc:  # handed to the consumer, raised there
                _put_until(chunks, exc, stop)
                return
            _put_until(chunks, _DONE, stop)

        thread = threading.Thread(target=produce, name="esm2cli-api", daemon=True)
        thread.start()
        try:
            while (item := chunks.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


class _Stopped(Exception):
    """The consumer of an Embedder iterator stopped early."""


def _put_until(chunks: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            chunks.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _checked_iterable(sequences: Any) -> Iterable[str]:
    """Refuses inputs that would otherwise be read wrongly: a mapping (iterating it gives its keys, which may
    well be valid residue letters), bytes (iterating them gives ints), or anything that is not iterable."""
    if isinstance(sequences, Mapping):
        raise InputError(
            f"sequences: got a {type(sequences).__name__} (a mapping): iterating it would embed its keys; "
            "pass its values, e.g. embed(list(d.values())), and zip the results with list(d)"
        )
    if isinstance(sequences, (bytes, bytearray, memoryview)):
        raise InputError(f"sequences: got {type(sequences).__name__}; decode it to a str first (e.g. seq.decode())")
    if hasattr(sequences, "columns") and hasattr(sequences, "iloc"):  # a pandas DataFrame iterates its column names
        raise InputError(
            f"sequences: got a {type(sequences).__name__}: iterating it would embed its column names; "
            "pass one column, e.g. embed(df['sequence'])"
        )
    if getattr(sequences, "ndim", None) == 0:  # a 0-d array is not iterable
        raise InputError(f"sequences: got a 0-d {type(sequences).__name__}; pass str(a) for one sequence")
    if not isinstance(sequences, Iterable):
        raise InputError(f"sequences: expected a string or an iterable of strings, got {type(sequences).__name__}")
    return sequences


def _records(sequences: Iterable[str], max_length: int | None) -> Iterator[Record]:
    """In-memory sequences as checked records, read lazily; each id is the index in the input."""
    for index, raw in enumerate(sequences):
        if not isinstance(raw, str):
            hint = "; decode it to a str first" if isinstance(raw, (bytes, bytearray)) else ""
            raise InputError(f"sequences[{index}]: expected a string, got {type(raw).__name__}{hint}")
        seq = normalise(raw)
        if problem := check_sequence(seq):
            raise InputError(f"sequences[{index}]: {problem}")
        if max_length is not None and len(seq) > max_length:
            raise InputError(
                f"sequences[{index}]: {len(seq)} residues, longer than {max_length} "
                "(long_sequences='error'; use 'truncate' or 'window' to embed it)"
            )
        yield Record(str(index), "", seq, index + 1)
