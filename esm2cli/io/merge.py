"""merge: the parts of a sharded run joined into one file, checked to come from one run."""

from __future__ import annotations

import json
import os
import re

import pyarrow.parquet as pq

from esm2cli.errors import OutputExistsError, PartsError
from esm2cli.io.lock import OutputLock
from esm2cli.io.parquet import concatenate, read_metadata
from esm2cli.io.schema import METADATA_KEY
from esm2cli.io.storage import exists, is_url, join, listdir, open_input

_PART = re.compile(r"^part-(\d{5})-of-(\d{5})(\.parquet|\.h5)$")


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
    with OutputLock(output):  # one run at a time toward one output, as embed and score
        return _merge_parts(prefix, output, overwrite)


def _merge_parts(prefix: str, output: str, overwrite: bool) -> int | None:
    from esm2cli.io.identity import describe_changes, same_file

    parts = find_parts(prefix)
    if any(same_file(part, output) for part in parts):
        raise OutputExistsError(f"{output} is one of the parts being merged: name a file outside {prefix}")
    _check_merge_output(prefix, output)
    from esm2cli.io import hdf5

    first = _part_metadata(parts[0])
    identity = {**first.get("identity", {}), "shard": "merged"}
    for part in parts[1:]:
        meta = _part_metadata(part)
        other = {**meta.get("identity", {}), "shard": "merged"}
        if other != identity:
            changes = "; ".join(describe_changes(identity, other))
            raise PartsError(f"{part} was made by another run than {parts[0]} ({changes}): rerun that shard")
    if exists(output):
        done = read_metadata(output)
        if done.get("identity") == identity:
            return None
        if not overwrite:
            raise OutputExistsError(f"{output} already exists (use --overwrite to replace it)")
    if hdf5.is_hdf5(parts[0]):
        if not hdf5.is_hdf5(output):
            raise PartsError(f"{prefix} holds HDF5 parts: name an .h5 output to merge them")
        return hdf5.merge(parts, output)
    if hdf5.is_hdf5(output):
        return hdf5.from_parquet(parts, output)
    with open_input(parts[0]) as handle:
        schema = pq.read_schema(handle)
    metadata = {**first, "identity": identity, "parts": len(parts)}
    return concatenate(parts, output, schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()}))


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
