"""The files of a search database and what vouches for them.

A database is a local folder: one folder per shard (``shard-00003-of-00008/``: ``vectors.f32`` or ``vectors.f16``,
``index.faiss`` for the approximate kinds, ``ids.parquet``, ``null.json``, and ``shard.json``, which says what the
shard holds and the SHA-256 of each of its files), the quantizer the shards of an IVF-PQ database share
(``trained.faiss``, with ``trained.json``), and ``manifest.json``: the format version, the vectors' identity, and
every shard present with its rows and files' digests. The manifest is rewritten from the shards' own records each
time a shard is committed, so it lists exactly the shards that are complete; a reader refuses a shard it lists
that is missing, one it does not list, a count short of the shard count, and a file whose digest differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from esm2cli.config import __version__
from esm2cli.errors import InputError
from esm2cli.io import storage

FORMAT = "esm2cli-search-db"
FORMAT_VERSION = 1  # raised whenever a file's layout or meaning changes: an older reader then refuses by name
MANIFEST = "manifest.json"
SHARD_RECORD = "shard.json"
IDS = "ids.parquet"
INDEX = "index.faiss"
NULL = "null.json"
# A flat shard keeps exact float32 rows; the approximate kinds keep float16 rows to re-rank their candidates.
VECTOR_FILES = {"float32": "vectors.f32", "float16": "vectors.f16"}
TRAINED = "trained.faiss"
TRAINED_RECORD = "trained.json"
_SHARD = re.compile(r"^shard-(\d{5,})-of-(\d{5,})$")
_BLOCK = 8 << 20


def shard_name(index: int, count: int) -> str:
    """``shard-00003-of-00008``: the folder of shard ``index`` (0-based) of ``count``."""
    return f"shard-{index:05d}-of-{count:05d}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(index, count) of a shard folder's name; None for any other name."""
    found = _SHARD.match(name)
    return (int(found.group(1)), int(found.group(2))) if found else None


def shard_folders(db: str) -> dict[str, tuple[int, int]]:
    """The shard folders present in ``db`` (committed ones: temporaries start with '.'), by name."""
    names = os.listdir(db) if os.path.isdir(db) else []
    return {name: parsed for name in sorted(names) if (parsed := parse_shard_name(name)) and _is_dir(db, name)}


def _is_dir(db: str, name: str) -> bool:
    return os.path.isdir(os.path.join(db, name))


def file_digest(path: str) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def write_json(path: str, record: dict) -> None:
    """Writes ``record`` to ``path`` atomically (it appears whole or not at all)."""
    with storage.AtomicFile(path) as out:
        out.handle.write((json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str) -> dict:
    """A JSON record written by write_json.

    Raises:
        InputError: The file is missing, unreadable or not a JSON object (named).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: not an esm2cli database record")
    return record


def check_format(record: dict, path: str) -> None:
    """Refuses a record of another format or format version, by name.

    Raises:
        InputError: Not an esm2cli database record, or one of another format version.
    """
    if record.get("format") != FORMAT:
        raise InputError(f"{path}: not an esm2cli search database (no '{FORMAT}' format field)")
    if record.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: a database of format version {record.get('format_version')!r} (built by esm2cli "
            f"{record.get('esm2cli_version', '?')}); this esm2cli ({__version__}) reads version {FORMAT_VERSION}: "
            "rebuild it with esm2cli index"
        )


def database_build(build: dict) -> dict:
    """A shard's build identity without the shard's index: what every shard of one database shares."""
    kept = {key: value for key, value in build.items() if key != "shard"}
    return {**kept, "shard_count": build["shard"][1]} if "shard" in build else kept


@contextmanager
def manifest_lock(db: str) -> Iterator[None]:
    """Held while the manifest is read from the shards and rewritten: shard tasks that finish together wait in turn
    (a blocking flock, held for the milliseconds that takes), so that none writes a list that misses another."""
    import fcntl

    fd = os.open(os.path.join(db, ".manifest.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def write_manifest(db: str, build: dict, *, prune: bool = False) -> dict:
    """Rewrites ``db/manifest.json`` from the records of the committed shards of this build.

    Args:
        db: The database folder.
        build: The build identity of any shard of the database (its shard index is ignored).
        prune: Delete the shard folders of other builds (--overwrite, once a shard of this one is complete).

    Returns:
        The manifest written.
    """
    import shutil

    wanted = database_build(build)
    with manifest_lock(db):
        records = []
        for name in shard_folders(db):
            path = os.path.join(db, name, SHARD_RECORD)
            record = read_json(path) if os.path.exists(path) else {}
            if database_build(record.get("build", {})) == wanted:
                records.append((name, record))
            elif prune:
                aside = os.path.join(db, f".{name}.{os.getpid()}-pruned.old")
                os.rename(os.path.join(db, name), aside)  # gone from the listing at once, deleted after
                shutil.rmtree(aside, ignore_errors=True)
        manifest = _manifest_of(db, records, wanted)
        write_json(os.path.join(db, MANIFEST), manifest)
    return manifest


def _manifest_of(db: str, records: list[tuple[str, dict]], build: dict) -> dict:
    first = records[0][1] if records else {}
    trained = os.path.join(db, TRAINED)
    shards = [
        {"name": name, "index": record["build"]["shard"][0], "rows": record["rows"], "files": record["files"],
         "search": record.get("search", {}), "null": record.get("null")}
        for name, record in records
    ]  # fmt: skip
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "esm2cli_version": __version__, "build": build,
        "identity": first.get("identity"), "metadata": first.get("metadata"), "kind": first.get("kind"),
        "hidden": first.get("hidden"), "shard_count": build.get("shard_count"),
        "rows": sum(shard["rows"] for shard in shards), "shards": shards,
        "trained": file_digest(trained) if first.get("kind") == "ivf-pq" and os.path.exists(trained) else None,
    }  # fmt: skip


def load_manifest(db: str | os.PathLike, *, verify: bool = True) -> dict:
    """The manifest of a database, checked against the folder: every shard it counts present, no other, each file
    of the size (and, with ``verify``, of the SHA-256) it records.

    Raises:
        InputError: The folder is no database, of another format version, or a shard or file is missing, extra
            or differs (each named, with the problem).
    """
    db = str(db)
    if not os.path.isdir(db):
        raise InputError(f"{db}: no such database folder")
    path = os.path.join(db, MANIFEST)
    if not os.path.exists(path):
        raise InputError(f"{path}: missing: not an esm2cli database, or its build has not finished (esm2cli index)")
    manifest = read_json(path)
    check_format(manifest, path)
    _check_shard_set(db, manifest)
    for shard in manifest["shards"]:
        for name, recorded in shard["files"].items():
            check_file(os.path.join(db, shard["name"], name), recorded, verify=verify)
    if manifest.get("trained") is not None:
        check_file(os.path.join(db, TRAINED), manifest["trained"], verify=verify)
    return manifest


def _check_shard_set(db: str, manifest: dict) -> None:
    listed = {shard["name"] for shard in manifest["shards"]}
    present = shard_folders(db)
    for name in sorted(set(present) - listed):
        raise InputError(f"{os.path.join(db, name)}: a shard that {MANIFEST} does not list (of another build?)")
    for name in sorted(listed - set(present)):
        raise InputError(f"{os.path.join(db, name)}: missing ({MANIFEST} lists it)")
    count = manifest.get("shard_count") or 0
    built = {shard["index"] for shard in manifest["shards"]}
    if missing := sorted(set(range(count)) - built):
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise InputError(f"{db}: {len(missing)} of {count} shards are not built: {shown}")
    if not manifest["shards"]:
        raise InputError(f"{db}: a database of no shards")


def check_file(path: str, recorded: dict, *, verify: bool = True) -> None:
    """Refuses a file that is missing or differs from its record (size always, SHA-256 with ``verify``).

    Raises:
        InputError: The file is missing, of another size, or its digest differs (named).
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: missing ({MANIFEST} records it)")
    size = os.path.getsize(path)
    if size != recorded["bytes"]:
        raise InputError(f"{path}: {size:,} bytes where {MANIFEST} records {recorded['bytes']:,}: damaged or replaced")
    if verify and file_digest(path)["sha256"] != recorded["sha256"]:
        raise InputError(f"{path}: its SHA-256 differs from the one {MANIFEST} records: damaged or replaced")


def inputs_identity(sources: list) -> list[dict]:
    """What a build read, input by input: the file's name, its rows and the digest of the run identity it records
    (which names the FASTA's content, the weights and every option), so a rerun over re-embedded or other inputs is
    never "already complete". The folder is left out: the same outputs moved or named by another relative path are
    the same inputs.
    """
    return [
        {"name": os.path.basename(source.path.rstrip("/")), "rows": source.rows,
         "identity": hashlib.sha256(json.dumps(source.metadata.get("identity"), sort_keys=True).encode()).hexdigest()}
        for source in sources
    ]  # fmt: skip
