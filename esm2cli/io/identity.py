"""A run's identity: what it read (a hash of the records), which weights, and the options that change the numbers.

One builder for every consumer: ``embed`` and its "already complete" check, committed chunks, ``score``,
the Python API, ``--reuse`` (numbers_identity) and the server's cache key (request_identity). An output or
a committed chunk is reused only when the identity it records equals the one of the run at hand, so a
rerun after an edit of the input, the weights or an option never keeps stale rows.

Every option of every command is declared once in OPTIONS: the identity key it goes to, or NOT_NUMBERS
(it cannot change a row's numbers). A test walks the commands' options and fails on one that is neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from esm2cli.config import EmbedConfig, InputConfig, ScoreConfig, ShardConfig
from esm2cli.errors import ModelLoadError

log = logging.getLogger(__name__)

ESM2 = "esm2"  # the model family of every file written before the family was recorded

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt")
_BLOCK = 8 << 20
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

NOT_NUMBERS = None  # an option declared as changing no number (where the output goes, how fast, what is logged)

# Each command's options (Click parameter names), and the Python API's arguments: the identity key each goes to,
# or NOT_NUMBERS. Devices, batch sizes and token budgets change the numbers only by rounding; --reuse copies rows
# only from outputs of an equal numbers identity, so it changes none either.
_RUN = {"model": "model_identity", "load_format": "model_identity", "dtype": "dtype", "devices": NOT_NUMBERS,
        "max_tokens": NOT_NUMBERS}  # fmt: skip
_LOGS = {"verbose": NOT_NUMBERS, "quiet": NOT_NUMBERS}
_EMBEDDING = {"layers": "layers", "pooling": "pooling", "truncate": "truncate", "long_sequences": "long_sequences",
              "window_overlap": "window_overlap"}  # fmt: skip
_SERVER_ONLY = (
    "host", "port", "batching", "max_batch_size", "max_wait_ms", "max_client_batch", "max_queue", "request_timeout",
    "max_body_bytes", "truncation", "graceful_timeout", "cache_size", "api_keys", "api_key_file", "public_metrics",
    "public_docs", "header_timeout", "body_timeout", "max_connections",
    "index",  # the database /search answers from, whose identity must be the server's (checked at startup)
)  # fmt: skip
OPTIONS: dict[str, dict[str, str | None]] = {
    "embed": {
        **_RUN, **_LOGS, **_EMBEDDING, "fasta": "input_sha256", "per_token": "per_token", "contacts": "contacts",
        "skip_invalid": "skip_invalid", "shard_index": "shard", "shard_count": "shard", "output": NOT_NUMBERS,
        "batch_size": NOT_NUMBERS, "allow_duplicate_ids": NOT_NUMBERS, "overwrite": NOT_NUMBERS,
        "output_format": NOT_NUMBERS, "chunk_size": NOT_NUMBERS, "reuse": NOT_NUMBERS, "s3_endpoint_url": NOT_NUMBERS,
        "output_dtype": "output_dtype",
    },
    "score": {
        **_RUN, **_LOGS, "fasta": "input_sha256", "mutations": "mutations_sha256", "pll": "mode",
        "all_substitutions": "mode", "method": "method", "truncate": "window", "skip_invalid": "skip_invalid",
        "output": NOT_NUMBERS, "batch_size": NOT_NUMBERS, "overwrite": NOT_NUMBERS, "s3_endpoint_url": NOT_NUMBERS,
    },
    # The server's cache key (request_identity): an answer from the cache must be the one the engine would compute.
    "serve": {**_RUN, **_LOGS, **_EMBEDDING, **dict.fromkeys(_SERVER_ONLY, NOT_NUMBERS)},
    "api": {
        **_RUN, **_EMBEDDING, "per_token": "per_token", "batch_size": NOT_NUMBERS, "chunk_size": NOT_NUMBERS,
        "reuse": NOT_NUMBERS, "output_dtype": "output_dtype",
    },
    # A database's build identity (search.build.build_identity): the vectors read, the kind, the null's decoys and
    # the shard. The decoys' device changes their vectors only by rounding; --train-only picks a step of the build.
    "index": {
        **_LOGS, "inputs": "inputs", "layer": "vectors", "kind": "kind", "decoys": "null", "fasta": "null",
        "seed": "null", "shard_index": "shard", "shard_count": "shard", "devices": NOT_NUMBERS,
        "train_only": NOT_NUMBERS, "output": NOT_NUMBERS, "overwrite": NOT_NUMBERS, "s3_endpoint_url": NOT_NUMBERS,
    },
}  # fmt: skip
# Commands that write no numbers of their own: they have no identity to declare options in.
WITHOUT_IDENTITY = {
    "bench": "measures speed; writes no output file",
    "download": "fetches weights; what they are is named by the runs that use them",
    "map": "draws the vectors of outputs, which must share one identity (checked); writes no vectors of its own",
    "merge": "copies the parts' rows and checks that the parts share one identity",
    "search": "writes hits of queries against a database, whose identity each query's vectors must share (checked)",
}

# What an identity holds beside the numbers: which records were read, and which slice of them.
_NOT_NUMBERS_KEYS = ("input_sha256", "input_records", "input_slice", "shard", "skip_invalid")
# Keys added after outputs were written without them: such an older identity reads as if it held these values.
_ADDED_LATER = {"model_family": ESM2, "output_dtype": "float32"}
# A model config's keys that name no part of the architecture (random weights are drawn from the architecture).
_NOT_ARCHITECTURE = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype")


def embedding_options(embed: EmbedConfig) -> dict:
    """Every EmbedConfig field in a JSON-stable form; a value that means nothing to the run is left out.

    Built from the dataclass's fields, so that a field added to EmbedConfig is in every identity at once.
    """
    out: dict = {}
    for f in fields(embed):
        value = getattr(embed, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    out["window_overlap"] = embed.window_overlap if embed.long_sequences == "window" else None
    if not embed.contacts:  # outputs written before contacts existed record no such key
        del out["contacts"]
    return out


def request_identity(*, weights: str, dtype: str, embed: EmbedConfig, model_family: str = ESM2) -> dict:
    """What decides the numbers of one sequence's row: the identity an output's row or a cached answer must share.

    Equal to numbers_identity of an embed run with these options, so that the server's cache and ``--reuse``
    agree on what makes two rows interchangeable.

    Args:
        weights: The weights' identity (WeightsStamp.confirm's).
        dtype: The resolved dtype (never "auto").
        embed: The options the rows are computed with.
        model_family: "esm2" (or the family of the loaded model).
    """
    return {"model_identity": weights, "model_family": model_family, "dtype": dtype, **embedding_options(embed)}


def identity_digest(identity: Mapping) -> bytes:
    """The SHA-256 of an identity in canonical JSON (a cache key)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).digest()


def embed_identity(*, input_sha256: str, input_records: int, weights: str, dtype: str, embed: EmbedConfig,
                   inputs: InputConfig, shard: ShardConfig, model_family: str = ESM2,
                   input_slice: Mapping | None = None) -> dict:  # fmt: skip
    """An embed run's identity: the input's content, which records of it, and what decides every row's numbers.

    ``input_slice`` is a shard's byte range of the input with the file's size and stamp (io.split.InputSlice):
    such a shard's identity covers its own slice, so that its checks and its "already complete" do not grow
    with the input.
    """
    return {
        "input_sha256": input_sha256, "input_records": input_records,
        **request_identity(weights=weights, dtype=dtype, embed=embed, model_family=model_family),
        "skip_invalid": inputs.skip_invalid, "shard": [shard.index, shard.count],
        **({"input_slice": dict(input_slice)} if input_slice is not None else {}),
    }  # fmt: skip


def score_identity(*, input_sha256: str, mutations_sha256: str | None, weights: str, dtype: str,
                   score: ScoreConfig, model_family: str = ESM2) -> dict:  # fmt: skip
    """A score run's identity: the records and mutants read (their bytes), the weights and every ScoreConfig field.

    The mutant list is named by its content, not its path, so an edited list is never "already complete".
    """
    options = {f.name: getattr(score, f.name) for f in fields(score) if f.name != "mutations"}
    return {
        "input_sha256": input_sha256, "mutations_sha256": mutations_sha256, "model_identity": weights,
        "model_family": model_family, "dtype": dtype, **options,
    }  # fmt: skip


def numbers_identity(identity: dict) -> dict:
    """What decides a row's numbers, given its sequence: the identity without the input and the shard.

    Two outputs whose numbers identities are equal give a sequence the same row (bit for bit in float32),
    so a row of one may stand for the other's (``--reuse``).
    """
    return {k: v for k, v in recorded(identity).items() if k not in _NOT_NUMBERS_KEYS}


def recorded(identity: Mapping | None) -> dict:
    """An identity read from a file, with the keys added since it was written at their old meaning."""
    return {**_ADDED_LATER, **identity} if identity else {}


def same_run(found: Mapping | None, identity: Mapping) -> bool:
    """True when an identity read from a file (``found``) is this run's."""
    return bool(found) and recorded(found) == recorded(identity)


def describe_changes(before: dict, now: dict) -> list[str]:
    """Names what differs between two identities, one short phrase each (for an exit-2 message)."""
    changes = []
    before, now = recorded(before), recorded(now)
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            if key == "input_sha256":
                changes.append("the input's content changed")
            elif key == "mutations_sha256":
                changes.append("the mutant list's content changed")
            elif key == "model_identity":
                changes.append("the model's weights changed")
            elif key == "reuse":
                changes.append("the files given to --reuse changed (or --reuse did)")
            else:
                changes.append(f"{key} was {before.get(key)!r}, now {now.get(key)!r}")
    return changes


# ---- the weights ------------------------------------------------------------------------------------------


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


def _weight_files(source: str, load_format: str) -> tuple[list[Path], Path]:
    """The local files that name the weights (and the folder their names are relative to); none for a hub id."""
    path = Path(source).expanduser()
    if load_format == "dummy":
        config = path / "config.json"
        return ([config], path) if config.is_file() else ([], path)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES), path
    return [], path


def _signature(paths: list[Path]) -> tuple:
    """What changes when a file is rewritten or replaced: its size, modification time and inode."""
    out: list[tuple] = []
    for path in paths:
        try:
            st = path.stat()
            out.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append((str(path), None, None, None))
    return tuple(out)


def architecture_identity(config: Mapping) -> str:
    """Names random weights by the architecture they are drawn from (a model config as a dict)."""
    kept = {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}
    return "random:arch:" + hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class WeightsStamp:
    """The weights' identity, taken from their bytes before they are loaded and confirmed once they are.

    A file rewritten between the hash and the load would give numbers of other weights than the identity
    names; confirm() refuses that, so the identity a run records is the one of the bytes it read.

    Attributes:
        source: The resolved model source.
        load_format: "auto" or "dummy".
        identity: None when the weights cannot be named before loading (a hub model not cached yet, random
            weights of a checkpoint's architecture).
        signature: Size, modification time and inode of each file hashed.
    """

    source: str
    load_format: str
    identity: str | None
    signature: tuple = ()

    def confirm(self, loaded_source: str, architecture: Mapping | None = None) -> str:
        """The identity of the weights the run loaded, from ``loaded_source`` (LoadedModel.source).

        Args:
            loaded_source: Where the weights were read from (a hub download's local folder, a checkpoint).
            architecture: The loaded model's config as a dict (names random weights of a checkpoint).

        Raises:
            ModelLoadError: A file of the weights changed since it was hashed.
        """
        files = [Path(path) for path, *_ in self.signature]
        if _signature(files) != self.signature:
            raise ModelLoadError(
                f"{self.source}: the weights changed while they were loaded (a file was rewritten); run again"
            )
        if self.identity is not None:
            return self.identity
        if self.load_format == "dummy" and architecture is not None:
            return architecture_identity(architecture)
        return model_identity(loaded_source, self.load_format) or f"unresolved:{loaded_source}"


def stamp_weights(source: str, load_format: str) -> WeightsStamp:
    """Hashes the weights at ``source`` before they are loaded (see WeightsStamp).

    Args:
        source: The resolved model source (a hub id, a directory or a file).
        load_format: "dummy" for seeded random weights, else "auto".
    """
    files, root = _weight_files(source, load_format)
    signature = _signature(files)  # before the hash: a rewrite during the hash shows at confirm()
    return WeightsStamp(source, load_format, model_identity(source, load_format), signature)


def model_identity(source: str, load_format: str) -> str | None:
    """Names the weights a run uses: a content hash for local files, the commit for a hub model.

    Args:
        source: The resolved model source (a hub id, a directory or a file).
        load_format: "dummy" for seeded random weights, else "auto".

    Returns:
        A string that changes whenever the weights change; None when they cannot be named before loading:
        a hub model not cached yet, or random weights of a checkpoint file's architecture (its cfg).
    """
    path = Path(source).expanduser()
    files, root = _weight_files(source, load_format)
    if load_format == "dummy":
        if path.is_file():  # a fair-esm .pt: the architecture is in its cfg, read when it loads
            return None
        return f"random:{_hash_files(files, root) if files else source}"
    if files or path.is_dir():
        return f"sha256:{_hash_files(files, root)}"
    revision = _hub_revision(source)
    return f"hub:{source}@{revision}" if revision else None


# ---- paths -------------------------------------------------------------------------------------------------


def stdin_is(path: str | os.PathLike) -> bool:
    """True when standard input is redirected from this very file (``embed - -o x.fa < x.fa``)."""
    if "://" in str(path):
        return False
    try:
        return os.path.samestat(os.fstat(0), os.stat(path))
    except OSError:
        return False


def one_stream(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two inputs are one stream: '-' twice, '-' and /dev/stdin, or one FIFO or pipe named twice.

    A stream is read once: the second reader would find it drained, or (a FIFO) wait for a writer for ever.
    """
    a, b = str(a), str(b)
    if a == "-" or b == "-":
        return a == b or stdin_is(b if a == "-" else a)
    return same_file(a, b)


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
