"""A search database opened for queries: ``Index.open(DB)``, then top-k hits for vectors or sequences.

>>> index = Index.open("db")
>>> index.search_sequences(["MKTAYIAKQR"], k=5)          # embedded with the database's own model and options
>>> index.search_vectors(vectors, k=10, max_evalue=1e-3)  # vectors of the database's identity

Every shard is searched and the shards' best merged (highest score first, ties by the earlier row of the inputs),
so a database built in shards answers as one built whole. E-values are the sum over shards of each shard's null
model at that shard's size (E = sum_s E_s(score, rows_s)): the expected number of decoy hits that good in the
whole database.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from esm2cli.config import DEFAULT_TOP_K, DEFAULT_WINDOW_OVERLAP
from esm2cli.errors import ConfigError, InputError
from esm2cli.io.identity import describe_changes, recorded
from esm2cli.search import ann, exact, manifest
from esm2cli.search.vectors import unit_rows, vector_identity

if TYPE_CHECKING:
    from esm2cli.api import Embedder

QUERY_ROWS = 1024  # queries searched at a time: bounds the (queries x block) score matrix at 1024 x BLOCK_BYTES / 4
# Kept out of a query's comparison with the database: float16 storage rounds a stored vector by ~1e-3 relative,
# which moves a cosine by no more; every other key changes what the vectors are.
_QUERY_IGNORED = ("output_dtype",)


@dataclass(frozen=True)
class Hit:
    """One database vector found for a query.

    Attributes:
        target: The target's id (its FASTA id in the outputs indexed).
        score: The cosine of the query's and the target's vectors.
        evalue: The expected number of hits this good of a decoy query in the whole database (None: the database
            has no null model, built with --decoys 0).
        rank: 1 for the best hit of a query, 2 for the next, ...
        length: The target's length in residues.
    """

    target: str
    score: float
    evalue: float | None
    rank: int
    length: int | None = None


@dataclass
class _Shard:
    """One shard, opened: its vectors memory-mapped, its index (approximate kinds) and null model loaded."""

    name: str
    offset: int  # the shard's first row among the database's
    vectors: np.ndarray
    ids: Any  # pyarrow string array
    lengths: np.ndarray
    index: Any = None
    setting: dict = field(default_factory=dict)
    null: Any = None

    def top(self, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            return exact.top_k(queries, self.vectors, k)
        setting = {**self.setting, **({"nprobe": nprobe} if nprobe and "nprobe" in self.setting else {})}
        return ann.search(self.index, self.vectors, queries, k, setting)


class Index:
    """A database built by ``esm2cli index``, open for search. Build one with Index.open.

    Attributes:
        path: The database folder.
        size: The number of target vectors.
        hidden: Their width.
        kind: "flat", "ivf-pq" or "hnsw".
        identity: The vector identity of the database (search.vectors.vector_identity): a query must share it.
        metadata: The esm2cli metadata of the first input indexed (model, model_source, random_weights, layers...).
    """

    def __init__(self, path: str, record: dict, shards: list[_Shard]):
        self.path = path
        self.manifest = record
        self.size = int(record["rows"])
        self.hidden = int(record["hidden"])
        self.kind = str(record["kind"])
        self.identity = dict(record["identity"])
        self.metadata = dict(record["metadata"])
        self._shards = shards

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> Index:
        """Opens a database, checked against its manifest first.

        Args:
            path: The database folder.
            verify: Check each file's SHA-256 against the manifest (reads every file once); sizes are checked always.

        Raises:
            InputError: No database there, one of another format version, a missing or extra shard, or a file
                whose size or digest differs from the manifest (each named).
        """
        path = str(path)
        record = manifest.load_manifest(path, verify=verify)
        shards, offset = [], 0
        for entry in sorted(record["shards"], key=lambda shard: shard["index"]):
            shards.append(_open_shard(path, record, entry, offset))
            offset += entry["rows"]
        return cls(path, record, shards)

    @property
    def has_evalues(self) -> bool:
        """True when every shard has a null model (the database was built with decoys)."""
        return all(shard.null is not None for shard in self._shards)

    def check_query_identity(self, identity: dict, what: str) -> None:
        """Refuses queries whose vectors are of another identity than the database's.

        Args:
            identity: The queries' vector identity (search.vectors.vector_identity).
            what: What the message names (a file, "the model given").

        Raises:
            ConfigError: One line naming what differs (model weights, layer, pooling, dtype, ...).
        """
        mine, theirs = _comparable(self.identity), _comparable(identity)
        if mine != theirs:
            changes = "; ".join(describe_changes(mine, theirs))
            raise ConfigError(f"{what}: vectors of another model or options than the database {self.path} "
                              f"(the database's first, the query's second: {changes})")  # fmt: skip

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = DEFAULT_TOP_K,
        *,
        min_score: float | None = None,
        max_evalue: float | None = None,
        nprobe: int | None = None,
    ) -> list[list[Hit]]:
        """The k best targets of each query vector.

        Args:
            vectors: (n, hidden) query vectors (normalised here), of the database's identity.
            k: Hits per query at most (1 to the database's size).
            min_score: Drop hits of a lower cosine.
            max_evalue: Drop hits of a higher E-value (needs a database built with decoys).
            nprobe: IVF-PQ: the inverted lists visited (default: the one measured to reach recall@10 >= 0.95).

        Returns:
            One list per query, in query order, best hit first.

        Raises:
            ConfigError: k out of range, vectors of another width, or max_evalue without a null model.
        """
        self.check_request(k, max_evalue, min_score)
        queries = np.asarray(vectors, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.hidden:
            raise ConfigError(f"query vectors of shape {queries.shape}: the database {self.path} holds {self.hidden}")
        hits: list[list[Hit]] = []
        for start in range(0, len(queries), QUERY_ROWS):
            block = unit_rows(queries[start : start + QUERY_ROWS], [f"query {i}" for i in range(start, len(queries))],
                              "the query vectors")  # fmt: skip
            hits += self._search_block(block, k, min_score, max_evalue, nprobe)
        return hits

    def check_request(self, k: int, max_evalue: float | None = None, min_score: float | None = None) -> None:
        """Refuses, before any work, a k of no hit or of more than the database holds, a NaN or negative threshold,
        and an E-value filter on a database without a null model (ConfigError)."""
        self.check_k(k)
        check_thresholds(min_score, max_evalue)
        if max_evalue is not None and not self.has_evalues:
            raise ConfigError(f"--max-evalue: {self.path} has no null model (built with --decoys 0): no E-values")

    def check_k(self, k: int) -> None:
        """Refuses a k of no hit or of more hits than the database holds (ConfigError)."""
        if not isinstance(k, int | np.integer) or not 1 <= k <= self.size:
            raise ConfigError(
                f"-k {k}: the database {self.path} holds {self.size:,} vectors: ask for 1 to {self.size:,}"
            )

    def _search_block(self, queries, k, min_score, max_evalue, nprobe) -> list[list[Hit]]:
        parts = [shard.top(queries, k, nprobe) for shard in self._shards]
        scores = np.concatenate([part[0] for part in parts], axis=1)
        keys = np.concatenate([np.where(rows >= 0, rows + shard.offset, np.iinfo(np.int64).max)
                               for shard, (_, rows) in zip(self._shards, parts, strict=True)], axis=1)  # fmt: skip
        scores, keys = exact.best(scores, keys, k)
        evalues = self._evalues(scores) if self.has_evalues else None
        out = []
        for q in range(len(queries)):
            row = []
            for rank in range(k):
                score, key = float(scores[q, rank]), int(keys[q, rank])
                e = None if evalues is None else float(evalues[q, rank])
                if not np.isfinite(score) or (min_score is not None and score < min_score):
                    break
                if max_evalue is not None and e is not None and e > max_evalue:
                    continue
                target, length = self._target(key)
                row.append(Hit(target=target, score=score, evalue=e, rank=rank + 1, length=length))
            out.append(row)
        return out

    def _evalues(self, scores: np.ndarray) -> np.ndarray:
        """E = sum over shards of each shard's null at its own size; -inf scores (no hit) get E = inf."""
        finite = np.isfinite(scores)
        flat = np.where(finite, scores, 0).astype(np.float64).ravel()
        total = np.zeros_like(flat)
        for shard in self._shards:
            total += np.asarray(shard.null.evalue(flat, len(shard.vectors)), np.float64)
        return np.where(finite, total.reshape(scores.shape), np.inf)

    def _target(self, key: int) -> tuple[str, int]:
        for shard in reversed(self._shards):
            if key >= shard.offset:
                row = key - shard.offset
                return str(shard.ids[row]), int(shard.lengths[row])
        raise AssertionError(f"row {key} lies in no shard: this is a bug")

    def embedder(self, **overrides) -> Embedder:
        """An Embedder that computes vectors of the database's identity (its model, layer, pooling, truncation or
        windows, dtype); the caller closes it.

        Args:
            overrides: Embedder arguments to use instead (devices, batch_size, and model, load_format or dtype:
                these must still give the database's identity).

        Raises:
            ConfigError: The Embedder's identity differs from the database's (what differs is named).
            ModelLoadError, DeviceError: The model or devices are unusable.
        """
        return embedder_for(self.identity, self.metadata, what="the model and options given", check=self, **overrides)

    def search_sequences(
        self, sequences: Iterable[str], k: int = DEFAULT_TOP_K, *, embedder: Embedder | None = None, **filters
    ) -> list[list[Hit]]:
        """The k best targets of each sequence, embedded with ``embedder`` (or one of Index.embedder, closed after).

        Args:
            sequences: Protein sequences.
            k, filters: As search_vectors (min_score, max_evalue, nprobe).
            embedder: An Embedder of the database's identity (checked).

        Raises:
            ConfigError: The embedder's identity differs from the database's; k out of range.
            InputError: A sequence cannot be embedded.
        """
        self.check_k(k)
        own = embedder is None
        model = self.embedder() if embedder is None else embedder
        try:
            if not own:
                self.check_query_identity(embedder_identity(model), "the embedder given")
            vectors = model.embed(list(sequences))
        finally:
            if own:
                model.close()
        return self.search_vectors(np.asarray(vectors).reshape(-1, self.hidden), k, **filters)


def _comparable(identity: dict) -> dict:
    return {key: value for key, value in recorded(identity).items() if key not in _QUERY_IGNORED}


def embedder_identity(embedder: Embedder) -> dict:
    """The vector identity of an Embedder's single layer (search.vectors.vector_identity)."""
    if len(embedder.layers) != 1:
        raise ConfigError(f"an embedder of layers {list(embedder.layers)}: a search needs one layer's vectors")
    return vector_identity({"identity": embedder.identity}, embedder.layers[0])


def embedder_options(identity: dict, metadata: dict) -> dict:
    """The Embedder arguments that compute vectors of ``identity``, from the metadata of an output that holds some.

    The model is the one the run named (an alias or hub id resolves as it did then); a local path that no longer
    resolves from here falls back on the source the run resolved it to.
    """
    model = str(metadata.get("model") or metadata.get("model_source"))
    source = metadata.get("model_source")
    if source and not os.path.exists(model) and os.path.exists(str(source)):
        model = str(source)
    window = identity.get("long_sequences") == "window"
    return dict(
        model=model, load_format="dummy" if metadata.get("random_weights") else "auto", dtype=identity["dtype"],
        layers=[int(identity["layer"])], pooling=identity["pooling"], truncate=identity["truncate"],
        long_sequences=identity["long_sequences"], output_dtype=identity.get("output_dtype", "float32"),
        window_overlap=identity.get("window_overlap") if window else DEFAULT_WINDOW_OVERLAP,
    )  # fmt: skip


def embedder_for(identity: dict, metadata: dict, *, what: str, check: Index | None = None, **overrides) -> Embedder:
    """An Embedder of the identity (embedder_options, with ``overrides``), checked to compute vectors of it.

    Raises:
        ConfigError: The Embedder's vectors would be of another identity (``what`` is named, and what differs).
    """
    from esm2cli.api import Embedder

    options = {**embedder_options(identity, metadata), **{k: v for k, v in overrides.items() if v is not None}}
    embedder = Embedder(**options)
    try:
        found = embedder_identity(embedder)
        if check is not None:
            check.check_query_identity(found, what)
        elif _comparable(found) != _comparable(identity):
            raise ConfigError(f"{what}: " + "; ".join(describe_changes(_comparable(identity), _comparable(found))))
    except BaseException:
        embedder.close()
        raise
    return embedder


def _open_shard(db: str, record: dict, entry: dict, offset: int) -> _Shard:
    folder = os.path.join(db, entry["name"])
    files = entry["files"]
    dtype = next(dtype for dtype, name in manifest.VECTOR_FILES.items() if name in files)
    vectors = exact.open_vectors(os.path.join(folder, manifest.VECTOR_FILES[dtype]), entry["rows"],
                                 int(record["hidden"]), dtype)  # fmt: skip
    try:
        table = pq.read_table(os.path.join(folder, manifest.IDS), columns=["id", "length"])
    except OSError as exc:
        raise InputError(f"{os.path.join(folder, manifest.IDS)}: unreadable ({exc})") from None
    shard = _Shard(entry["name"], offset, vectors, table.column("id").combine_chunks(),
                   table.column("length").to_numpy(), setting=dict(entry.get("search") or {}))  # fmt: skip
    shard.setting.pop("recall_at_10", None)
    if manifest.INDEX in files:
        import faiss

        shard.index = faiss.read_index(os.path.join(folder, manifest.INDEX))
    if manifest.NULL in files:
        shard.null = _null_model(os.path.join(folder, manifest.NULL))
    return shard


def _null_model(path: str):
    """The shard's null model (search.null)."""
    from esm2cli.search.null import NullModel

    return NullModel.from_json(manifest.read_json(path))


def check_thresholds(min_score: float | None, max_evalue: float | None) -> None:
    """Refuses a NaN --min-score or --max-evalue, or a negative --max-evalue (ConfigError): every comparison with
    NaN is false, so it would silently keep every hit, and no E-value is below 0."""
    if min_score is not None and math.isnan(min_score):
        raise ConfigError(f"--min-score {min_score}: not a number; give a cosine from -1 to 1")
    if max_evalue is not None and not max_evalue >= 0:
        raise ConfigError(f"--max-evalue {max_evalue}: give an E-value of 0 or more")
