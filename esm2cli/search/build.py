"""esm2cli index: a search database built from esm2cli outputs, shard by shard, atomically and in bounded memory.

A build (or a shard task) writes its shard into a temporary folder beside it (``DB/.shard-...<pid>-<hex>.tmp``),
streaming the inputs' rows into the vectors file and ids.parquet, then builds the index, measures how far to
search, fits the null model on decoys, writes shard.json with every file's digest, and renames the folder into
place; the manifest is then rewritten from the shards present. A build killed at any point leaves no shard that
looks complete: the next one sweeps the temporary folder and starts the shard again. A shard of this very build is
"already complete"; a database of another build is replaced only with --overwrite, and only once the new shard is
complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esm2cli.config import AUTO_FLAT_MAX_VECTORS, IndexConfig, ShardConfig, __version__
from esm2cli.errors import ConfigError, OutputExistsError
from esm2cli.io import storage
from esm2cli.io.identity import describe_changes, same_file
from esm2cli.io.lock import OutputLock
from esm2cli.search import ann, exact, manifest, train
from esm2cli.search.vectors import VectorBatch, VectorInput, open_inputs, read_batches, total_rows, unit_rows

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
_IDS_SCHEMA = pa.schema([("id", pa.string()), ("description", pa.string()), ("length", pa.int32()),
                         ("truncated", pa.bool_()), ("windows", pa.int32()), ("sequence_sha256", pa.string()),
                         ("source", pa.string())])  # fmt: skip


@dataclass(frozen=True)
class BuildSummary:
    """What a build did, for the command's last line."""

    db: str
    part: str  # the shard folder written, or trained.faiss
    kind: str
    rows: int = 0
    already_complete: bool = False
    seconds: float = 0.0
    search: dict = field(default_factory=dict)
    null: str | None = None


def resolve_kind(kind: str, total: int) -> str:
    """--kind auto: flat (exact) below AUTO_FLAT_MAX_VECTORS vectors, IVF-PQ from there on."""
    if kind != "auto":
        return kind
    return "flat" if total < AUTO_FLAT_MAX_VECTORS else "ivf-pq"


def build_index(
    inputs: Sequence[str | os.PathLike],
    db: str | os.PathLike,
    config: IndexConfig,
    *,
    shard: ShardConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[int], Progress] | None = None,
) -> BuildSummary:
    """Builds a database (or one shard of it, or only IVF-PQ's shared quantizer) from esm2cli outputs.

    Args:
        inputs: Output files, part folders or prefixes (search.vectors.open_inputs), all of one vector identity.
        db: The database folder (local: its vectors are memory-mapped).
        config: What to build.
        shard: Build only this shard: a contiguous slice of the inputs' rows, into DB/shard-<i>-of-<n>/.
        overwrite: Replace a database (or quantizer) of another build, once the new shard is complete.
        progress: Given the rows to write, returns a callback told of each batch's rows.

    Raises:
        InputError: An input is no esm2cli output, empty, damaged, or of another identity (named).
        ConfigError: The folder cannot hold a database; an IVF-PQ shard without its trained quantizer.
        OutputExistsError: A database of another build is there and overwrite is False.
        OutputLockedError: Another build writes the same shard.
    """
    db = str(db)
    _check_folder(db, inputs)
    sources = open_inputs(inputs, layer=config.layer)
    total = total_rows(sources)
    config = replace(config, kind=resolve_kind(config.kind, total))
    _check_decoys(config.decoys)
    os.makedirs(db, exist_ok=True)
    start = time.perf_counter()
    if config.train_only:
        if config.kind != "ivf-pq":
            raise ConfigError(f"--train-only trains the quantizer IVF-PQ shards share; --kind {config.kind} has none")
        done = train.train_quantizer(db, sources, config, overwrite)
        return BuildSummary(db, manifest.TRAINED, "ivf-pq", total, done, time.perf_counter() - start)
    shard = shard or ShardConfig()
    trained = None
    if config.kind == "ivf-pq":
        if shard.count == 1:
            train.train_quantizer(db, sources, config, overwrite)
        trained = train.require_trained(db, sources, config)
    build = build_identity(sources, config, shard, trained)
    summary = _build_shard(_Plan(db, sources, config, shard, build, overwrite, progress))
    return replace(summary, seconds=time.perf_counter() - start)


def build_identity(sources: Sequence[VectorInput], config: IndexConfig, shard: ShardConfig,
                   trained: str | None = None) -> dict:  # fmt: skip
    """A shard's build identity: the vectors read (identity, inputs), the kind, the null's options, the quantizer
    it is built on and the shard. A shard recording this very identity is already complete."""
    fasta = config.fasta
    null = {"decoys": config.decoys, "seed": config.seed,
            "fasta": {"name": os.path.basename(fasta), **storage.file_stamp(fasta)} if fasta else None}  # fmt: skip
    return {
        "format_version": manifest.FORMAT_VERSION, "vectors": sources[0].identity, "hidden": sources[0].hidden,
        "inputs": manifest.inputs_identity(list(sources)), "kind": config.kind, "null": null if config.decoys else None,
        "trained": trained, "shard": [shard.index, shard.count],
    }  # fmt: skip


def _check_decoys(decoys: int) -> None:
    """Refuses a decoy count the null cannot be fitted on before any vector is read."""
    from esm2cli.search.null import MIN_DECOYS

    if decoys and decoys < MIN_DECOYS:
        raise ConfigError(f"--decoys {decoys}: at least {MIN_DECOYS} are needed to fit E-values (0: no E-values)")


def _check_folder(db: str, inputs: Sequence[str | os.PathLike]) -> None:
    if storage.is_url(db):
        raise ConfigError(f"{db}: a database is a local folder (its vectors are memory-mapped): name a local path")
    if os.path.exists(db) and not os.path.isdir(db):
        raise ConfigError(f"{db} is a file: name a folder for the database")
    for source in map(str, inputs):
        if not storage.is_url(source) and os.path.exists(db) and same_file(source, db):
            raise ConfigError(f"{db} is one of the inputs: name another folder")
    foreign = sorted(name for name in os.listdir(db) if not _database_entry(name)) if os.path.isdir(db) else []
    if foreign:
        # a database's files beside a user's are a mess --overwrite could not clean without deleting theirs
        raise ConfigError(f"{db} holds files no database holds ({', '.join(foreign[:3])}): name a new or empty folder")


def _database_entry(name: str) -> bool:
    """A name a database folder holds: its manifest, quantizer, shards, or an esm2cli temporary or lock."""
    fixed = (manifest.MANIFEST, manifest.TRAINED, manifest.TRAINED_RECORD)
    return name in fixed or name.startswith((".", "shard-"))


@dataclass(frozen=True)
class _Plan:
    db: str
    sources: list[VectorInput]
    config: IndexConfig
    shard: ShardConfig
    build: dict
    overwrite: bool
    progress: Callable[[int], Progress] | None

    @property
    def name(self) -> str:
        return manifest.shard_name(self.shard.index, self.shard.count)


def _build_shard(plan: _Plan) -> BuildSummary:
    target = os.path.join(plan.db, plan.name)
    with OutputLock(target):
        sweep_temporaries(plan.db, plan.name)
        if _complete(target, plan.build):
            manifest.write_manifest(plan.db, plan.build, prune=plan.overwrite)
            return BuildSummary(plan.db, plan.name, plan.config.kind, already_complete=True)
        _check_other_builds(plan)
        tmp = os.path.join(plan.db, f".{plan.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        os.makedirs(tmp)
        try:
            record = _write_shard(plan, tmp)
            _commit(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        manifest.write_manifest(plan.db, plan.build, prune=plan.overwrite)
    null = record["null"]["description"] if record.get("null") else None
    return BuildSummary(plan.db, plan.name, plan.config.kind, record["rows"], search=record["search"], null=null)


def _complete(target: str, build: dict) -> bool:
    """True when ``target`` holds a shard of this very build whose files match their record."""
    path = os.path.join(target, manifest.SHARD_RECORD)
    if not os.path.exists(path):
        return False
    record = manifest.read_json(path)
    if record.get("build") != build:
        return False
    try:
        for name, recorded in record["files"].items():
            manifest.check_file(os.path.join(target, name), recorded)
    except Exception as exc:  # damaged: this build writes it again
        log.warning("%s: %s; building it again", target, exc)
        return False
    return True


def _check_other_builds(plan: _Plan) -> None:
    """Refuses, unless --overwrite, a folder that holds shards of another build (or another database's files)."""
    if plan.overwrite:
        return
    wanted = manifest.database_build(plan.build)
    for name in manifest.shard_folders(plan.db):
        path = os.path.join(plan.db, name, manifest.SHARD_RECORD)
        found = manifest.read_json(path).get("build", {}) if os.path.exists(path) else {}
        if manifest.database_build(found) != wanted:
            changes = _build_changes(manifest.database_build(found), wanted)
            raise OutputExistsError(
                f"{plan.db} holds a database of another build ({name}: {changes}): add --overwrite to replace it "
                "(the old shards stay until the new one is complete)"
            )


def _build_changes(before: dict, now: dict) -> str:
    if not before:
        return "no shard.json: an unfinished or foreign folder"
    named = {"inputs": "the inputs changed (files, rows or the runs that made them)",
             "vectors": "the vectors' identity changed", "trained": "the IVF-PQ quantizer was retrained"}  # fmt: skip
    changes = [named[key] for key in named if before.get(key) != now.get(key)]
    rest = {key: before.get(key) for key in before if key not in named}
    changes += describe_changes(rest, {key: now.get(key) for key in now if key not in named})
    return "; ".join(changes) or "another build"


def _write_shard(plan: _Plan, tmp: str) -> dict:
    """Writes every file of the shard into ``tmp``, shard.json last; returns the shard's record."""
    start, stop = plan.shard.range(total_rows(plan.sources))
    dtype = "float32" if plan.config.kind == "flat" else "float16"
    files, content = _write_rows(plan, tmp, start, stop, dtype)
    rows = stop - start
    vectors = exact.open_vectors(os.path.join(tmp, manifest.VECTOR_FILES[dtype]), rows, plan.sources[0].hidden, dtype)
    search = _build_ann(plan, tmp, vectors, files) if plan.config.kind != "flat" and rows else {}
    null = _fit_null(plan, tmp, vectors, files)
    record = {
        "format": manifest.FORMAT, "format_version": manifest.FORMAT_VERSION, "esm2cli_version": __version__,
        "build": plan.build, "identity": plan.sources[0].identity, "metadata": plan.sources[0].metadata,
        "kind": plan.config.kind, "hidden": plan.sources[0].hidden, "rows": rows, "first_row": start,
        "content_sha256": content, "files": files, "search": search, "null": null,
    }  # fmt: skip
    manifest.write_json(os.path.join(tmp, manifest.SHARD_RECORD), record)
    return record


def shard_batches(sources: Sequence[VectorInput], start: int, stop: int) -> Iterator[VectorBatch]:
    """The rows [start, stop) of the inputs taken one after another; inputs wholly outside are not read."""
    offset = 0
    for source in sources:
        lo, offset = offset, offset + source.rows
        if offset <= start or lo >= stop:
            continue
        position = lo
        for batch in read_batches([source]):
            first, position = position, position + len(batch)
            if position <= start:
                continue
            if first >= stop:
                break
            yield _cut(batch, max(start - first, 0), min(stop, position) - first)


def _cut(batch: VectorBatch, lo: int, hi: int) -> VectorBatch:
    if lo == 0 and hi == len(batch):
        return batch
    return VectorBatch(
        path=batch.path, ids=batch.ids[lo:hi], descriptions=batch.descriptions[lo:hi], lengths=batch.lengths[lo:hi],
        truncated=batch.truncated[lo:hi], windows=batch.windows[lo:hi],
        sequence_sha256=batch.sequence_sha256[lo:hi], vectors=batch.vectors[lo:hi],
    )  # fmt: skip


def _write_rows(plan: _Plan, tmp: str, start: int, stop: int, dtype: str) -> tuple[dict, str]:
    """Streams the shard's rows into its vectors file and ids.parquet; returns their digests and that of the
    content (ids and float32 vectors, in order: what the shard holds, whatever file it came from)."""
    vectors_path = os.path.join(tmp, manifest.VECTOR_FILES[dtype])
    ids_path = os.path.join(tmp, manifest.IDS)
    digest, content = hashlib.sha256(), hashlib.sha256()
    update = plan.progress(stop - start) if plan.progress else None
    with open(vectors_path, "wb") as out, pq.ParquetWriter(ids_path, _IDS_SCHEMA) as ids:
        for batch in shard_batches(plan.sources, start, stop):
            data = batch.vectors.astype(dtype).tobytes()
            out.write(data)
            digest.update(data)
            content.update("\n".join(batch.ids).encode() + b"\n" + batch.vectors.tobytes())
            ids.write_table(_ids_table(batch))
            if update:
                update(len(batch))
        out.flush()
        os.fsync(out.fileno())
    vectors = {"bytes": os.path.getsize(vectors_path), "sha256": digest.hexdigest()}
    return {manifest.VECTOR_FILES[dtype]: vectors, manifest.IDS: manifest.file_digest(ids_path)}, content.hexdigest()


def _ids_table(batch: VectorBatch) -> pa.Table:
    return pa.table(
        [batch.ids, batch.descriptions, batch.lengths, batch.truncated, batch.windows, batch.sequence_sha256,
         [batch.path] * len(batch)],
        schema=_IDS_SCHEMA,
    )  # fmt: skip


def _build_ann(plan: _Plan, tmp: str, vectors: np.ndarray, files: dict) -> dict:
    """The shard's IVF-PQ (on the shared quantizer) or HNSW index, written to tmp; returns the search setting."""
    import faiss

    if plan.config.kind == "ivf-pq":
        index = faiss.read_index(os.path.join(plan.db, manifest.TRAINED))
    else:
        index = ann.new_hnsw(vectors.shape[1])
    log.info("building the %s index of %s (%d vectors)", plan.config.kind, plan.name, len(vectors))
    ann.fill(index, vectors)
    path = os.path.join(tmp, manifest.INDEX)
    faiss.write_index(index, path)
    files[manifest.INDEX] = manifest.file_digest(path)
    setting = ann.calibrate(index, vectors, plan.config.kind, plan.config.seed)
    log.info("%s: %s", plan.name, ", ".join(f"{key} {value}" for key, value in setting.items()))
    return setting


def _fit_null(plan: _Plan, tmp: str, vectors: np.ndarray, files: dict) -> dict | None:
    """Fits the shard's null model on decoy queries (search.null) and writes null.json; None with --decoys 0."""
    if not plan.config.decoys or not len(vectors):
        return None
    from esm2cli.search import null
    from esm2cli.search.index import embedder_for

    source = plan.sources[0]
    sequences, description = null.decoy_sequences(plan.sources, plan.config.fasta, plan.config.decoys, plan.config.seed)
    log.info("%s: embedding %d decoys (%s) for the null model", plan.name, len(sequences), description)
    with embedder_for(source.identity, source.metadata, what="the inputs' model (for the decoys)",
                      devices=plan.config.devices) as embedder:  # fmt: skip
        decoys = unit_rows(np.asarray(embedder.embed(sequences)), [f"decoy {i}" for i in range(len(sequences))],
                           "the decoys")  # fmt: skip
    scores, _ = exact.top_k(decoys, vectors, min(null.DECOY_TOP_K, len(vectors)))
    model = null.fit_null(scores, len(vectors), description)
    path = os.path.join(tmp, manifest.NULL)
    manifest.write_json(path, model.to_json())
    files[manifest.NULL] = manifest.file_digest(path)
    return {"description": description, "decoys": len(sequences)}


def _commit(tmp: str, target: str) -> None:
    """Renames the finished folder into place; an earlier shard there is moved aside first and deleted after."""
    _fsync_tree(tmp)
    aside = None
    if os.path.exists(target):
        aside = f"{os.path.dirname(target)}/.{os.path.basename(target)}.{os.getpid()}-{secrets.token_hex(4)}.old"
        os.rename(target, aside)
    os.rename(tmp, target)
    _fsync_dir(os.path.dirname(target))
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_temporaries(db: str, name: str) -> list[str]:
    """Deletes the folders that builds of shard ``name`` killed before their commit left (``.<name>.<pid>-<hex>.tmp``
    or ``.old``), whose process is gone. Called with the shard's lock held."""
    swept = []
    prefix = f".{name}."
    for entry in os.listdir(db):
        if not entry.startswith(prefix) or not entry.endswith((".tmp", ".old")):
            continue
        pid = entry[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not storage.process_alive(int(pid)):
            shutil.rmtree(os.path.join(db, entry), ignore_errors=True)
            swept.append(entry)
    if swept:
        log.info("removed %d unfinished build folder(s) of %s left by killed runs", len(swept), name)
    return swept
