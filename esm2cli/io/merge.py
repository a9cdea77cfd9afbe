"""merge: the parts of a sharded run joined into one file, checked to come from one run."""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import pyarrow.parquet as pq

from esm2cli.errors import DamagedFileError, OutputExistsError, PartsError
from esm2cli.io.lock import OutputLock
from esm2cli.io.parquet import concatenate, read_metadata
from esm2cli.io.schema import METADATA_KEY
from esm2cli.io.storage import is_url, join, listdir, open_input
from esm2cli.io.targets import check_target, is_complete, output_target

_PART = re.compile(r"^part-(\d{5,})-of-(\d{5,})(\.parquet|\.h5)$")  # as ShardConfig.part_name, for any count


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
        OutputLockedError: Another live run writes the same output.
    """
    output = output_target(output)  # a link is written through, as embed's and score's outputs
    with OutputLock(output):  # one run at a time toward one output, as embed and score
        return _merge_parts(prefix, output, overwrite)


def _merge_parts(prefix: str, output: str, overwrite: bool) -> int | None:
    from esm2cli.io.identity import same_file

    parts = find_parts(prefix)
    if any(same_file(part, output) for part in parts):
        raise OutputExistsError(f"{output} is one of the parts being merged: name a file outside {prefix}")
    _check_merge_output(prefix, output)
    check_target(output, {})  # a FIFO, a device or /dev/stdout: refused before its metadata is read
    from esm2cli.io import hdf5

    metas = [_part_metadata(part) for part in parts]
    identity = merged_identity(parts, [meta["identity"] for meta in metas])
    metadata = {**metas[0], "identity": identity, "parts": len(parts)}
    if is_complete(output, identity, overwrite):
        return None
    if hdf5.is_hdf5(parts[0]):
        if not hdf5.is_hdf5(output):
            raise PartsError(f"{prefix} holds HDF5 parts: name an .h5 output to merge them")
        return hdf5.merge(parts, output, metadata=metadata)
    if hdf5.is_hdf5(output) or not all(meta.get("allow_duplicate_ids") for meta in metas):
        check_ids_across(parts)  # HDF5 keys are the ids: repeats can never be kept there
    try:
        if hdf5.is_hdf5(output):
            return hdf5.from_parquet(parts, output, metadata=metadata)
        with open_input(parts[0]) as handle:
            schema = pq.read_schema(handle)
        return concatenate(parts, output, schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()}))
    except DamagedFileError as exc:
        raise PartsError(f"{exc}: rerun that shard") from exc


_PER_SHARD = ("input_sha256", "input_records", "input_slice", "shard")  # what differs from shard to shard


def merged_identity(parts: list[str], identities: list[dict]) -> dict:
    """The identity of the merged file, once the parts are known to come from one run over one input.

    Parts of a byte-range run each cover their own slice: their records' hashes are combined in shard order,
    and every part must have read the same version of the file (size and stamp).

    Raises:
        PartsError: A part was made with other options or weights, of another input, or of a file that
            changed between shards (the shard and both stamps named).
    """
    from esm2cli.io.identity import describe_changes, recorded

    def common(identity: dict) -> dict:
        return {k: v for k, v in identity.items() if k not in _PER_SHARD}

    identities = [recorded(identity) for identity in identities]  # keys added since, at their old meaning
    first = identities[0]
    sliced = "input_slice" in first
    for part, identity in zip(parts[1:], identities[1:], strict=True):
        mine, theirs = (common(first), common(identity)) if sliced else (first, {**identity, "shard": first["shard"]})
        if mine != theirs or sliced != ("input_slice" in identity):
            changes = "; ".join(describe_changes(mine, theirs)) or "one was split by bytes, the other by records"
            raise PartsError(f"{part} was made by another run than {parts[0]} ({changes}): rerun that shard")
    if not sliced:
        return {**first, "shard": "merged"}
    _check_same_file(parts, [identity["input_slice"] for identity in identities])
    combined = hashlib.sha256("".join(identity["input_sha256"] for identity in identities).encode()).hexdigest()
    whole = {**first["input_slice"], "bytes": [0, first["input_slice"]["size"]]}  # the merged file covers it all
    return {
        **common(first), "input_sha256": combined, "input_records": sum(i["input_records"] for i in identities),
        "input_slice": whole, "shard": "merged",
    }  # fmt: skip


def _check_same_file(parts: list[str], slices: list[dict]) -> None:
    """Refuses parts that read different versions of the input, or slices that do not tile it."""
    first = slices[0]
    for index, (part, piece) in enumerate(zip(parts, slices, strict=True)):
        if (piece["size"], piece["stamp"]) != (first["size"], first["stamp"]):
            raise PartsError(
                f"{part}: shard {index} read the input at size {piece['size']}, stamp {piece['stamp']}, but shard 0 "
                f"read it at size {first['size']}, stamp {first['stamp']}: the input changed between shards (or "
                "they read different files); rerun the shards made from the older version"
            )
        expected = [index * first["size"] // len(parts), (index + 1) * first["size"] // len(parts)]
        if piece["bytes"] != expected:
            raise PartsError(
                f"{part}: this file covers bytes {piece['bytes']} of the input, but shard {index} of {len(parts)} "
                f"covers {expected}: it is another shard's part (copied or renamed?); rerun shard {index}"
            )


def check_ids_across(parts: list[str]) -> None:
    """Refuses ids that occur in more than one part: each shard checked only its own records.

    Streams the id column part by part: 8 bytes an id are kept (a hash), and only ids whose hash repeats are
    read again, to name them.

    Raises:
        PartsError: Ids occur in several parts (named, with their shards).
    """
    hashes = []
    for part in parts:
        ids = _ids(part)
        hashes.append(np.fromiter((hash(i) for i in ids), dtype=np.int64, count=len(ids)))
    every = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
    values, counts = np.unique(every, return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if not suspects:
        return
    shards: dict[str, list[int]] = {}
    for index, part in enumerate(parts):
        for rec_id in _ids(part):
            if hash(rec_id) in suspects:
                shards.setdefault(rec_id, []).append(index)
    repeated = {rec_id: where for rec_id, where in shards.items() if len(set(where)) > 1}
    if repeated:
        shown = "; ".join(f"'{rec_id}' in shards {', '.join(map(str, sorted(set(w))))}"
                          for rec_id, w in list(repeated.items())[:20])  # fmt: skip
        more = f" ... and {len(repeated) - 20} more" if len(repeated) > 20 else ""
        raise PartsError(
            f"{len(repeated)} id(s) occur in more than one shard: {shown}{more} (each shard checks only its own "
            "records; rerun the shards with --allow-duplicate-ids to keep them all)"
        )


def _ids(part: str) -> list[str]:
    with open_input(part) as handle:
        return pq.read_table(handle, columns=["id"])["id"].to_pylist()


def _part_metadata(part: str) -> dict:
    """A part's metadata; a part without any (unreadable, cut short, not written by esm2cli) is named as such."""
    meta = read_metadata(part)
    if not meta.get("identity"):
        raise PartsError(
            f"{part} cannot be read as a part of an esm2cli run (truncated, corrupt or written by something else): "
            "rerun that shard"
        )
    return meta


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
