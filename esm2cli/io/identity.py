"""A run's identity: what it read (a hash of the records), which weights, and the options that change the numbers.

An output or a committed chunk is reused only when the identity it records equals the one of the run
at hand, so a rerun after an edit of the input, the weights or an option never keeps stale rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt")
_BLOCK = 8 << 20
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hash_files(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in paths)
    if total > 1 << 30:
        log.info("hashing %.1f GB of weights to identify the model", total / 1e9)
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def _hub_revision(repo_id: str) -> str | None:
    """The commit of a hub model in the local Hugging Face cache (None when it is not cached)."""
    if not _HUB_ID.match(repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id, or no hub library: loading will say what is wrong
        return None
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def model_identity(source: str, load_format: str) -> str | None:
    """Names the weights a run uses: a content hash for local files, the commit for a hub model.

    Args:
        source: The resolved model source (a hub id, a directory or a file).
        load_format: "dummy" for seeded random weights, else "auto".

    Returns:
        A string that changes whenever the weights change; None when a hub model is not cached yet
        (the caller loads it, then asks again).
    """
    path = Path(source).expanduser()
    if load_format == "dummy":
        config = path / "config.json"
        return f"random:{_hash_files([config], path) if config.is_file() else source}"
    if path.is_file():
        return f"sha256:{_hash_files([path], path.parent)}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
        return f"sha256:{_hash_files(files, path)}"
    revision = _hub_revision(source)
    return f"hub:{source}@{revision}" if revision else None


def options_identity(**options) -> dict:
    """The options that change the numbers, in a JSON-stable form."""
    return json.loads(json.dumps(options, sort_keys=True))


# What an identity holds beside the numbers: which records were read, and which slice of them.
_NOT_NUMBERS = ("input_sha256", "input_records", "input_slice", "shard", "skip_invalid")


def numbers_identity(identity: dict) -> dict:
    """What decides a row's numbers, given its sequence: the identity without the input and the shard.

    Two outputs whose numbers identities are equal give a sequence the same row (bit for bit in float32),
    so a row of one may stand for the other's (``--reuse``).
    """
    return {k: v for k, v in identity.items() if k not in _NOT_NUMBERS}


def describe_changes(before: dict, now: dict) -> list[str]:
    """Names what differs between two identities, one short phrase each (for an exit-2 message)."""
    changes = []
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            if key == "input_sha256":
                changes.append("the input's content changed")
            elif key == "model_identity":
                changes.append("the model's weights changed")
            elif key == "reuse":
                changes.append("the files given to --reuse changed (or --reuse did)")
            else:
                changes.append(f"{key} was {before.get(key)!r}, now {now.get(key)!r}")
    return changes


def stdin_is(path: str | os.PathLike) -> bool:
    """True when standard input is redirected from this very file (``embed - -o x.fa < x.fa``)."""
    if "://" in str(path):
        return False
    try:
        return os.path.samestat(os.fstat(0), os.stat(path))
    except OSError:
        return False


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two local paths name one file (after links and relative paths are resolved)."""
    if str(a) == "-" or str(b) == "-":
        return False
    if "://" in str(a) or "://" in str(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
