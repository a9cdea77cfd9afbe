"""The quantizer every shard of an IVF-PQ database shares (``DB/trained.faiss``), trained once on a sample of all
the inputs' vectors: shards built by separate tasks then place their vectors in the same lists and codes.

``esm2cli index ... --kind ivf-pq --train-only`` writes it before the shard tasks start; a build of the whole
database trains it itself. It is written atomically under its own lock, with ``trained.json`` recording what it was
trained on (the inputs, the seed, nlist and the PQ shape) and its digest, which every shard built on it records.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from esm2cli.config import IndexConfig
from esm2cli.errors import ConfigError, OutputExistsError
from esm2cli.io import storage
from esm2cli.io.lock import OutputLock
from esm2cli.search import ann, manifest
from esm2cli.search.vectors import VectorInput, read_batches, total_rows

log = logging.getLogger(__name__)


def train_identity(sources: Sequence[VectorInput], config: IndexConfig) -> dict:
    """What the quantizer is trained from: the inputs, the vectors' identity, the seed and the index's shape."""
    total = total_rows(sources)
    hidden = sources[0].hidden
    shape = ann.ivf_shape(total, hidden, ann.train_rows(total, hidden))
    return {"format_version": manifest.FORMAT_VERSION, "vectors": sources[0].identity, "hidden": hidden,
            "inputs": manifest.inputs_identity(list(sources)), "seed": config.seed, "shape": shape}  # fmt: skip


def sample_vectors(sources: Sequence[VectorInput], rows: int, seed: int) -> np.ndarray:
    """``rows`` vectors drawn uniformly without replacement from all the inputs (seeded), read in one pass."""
    total = total_rows(sources)
    wanted = np.sort(np.random.default_rng(seed).choice(total, size=rows, replace=False))
    out = np.empty((rows, sources[0].hidden), np.float32)
    filled, offset = 0, 0
    for batch in read_batches(sources):
        lo, hi = np.searchsorted(wanted, [offset, offset + len(batch)])
        out[filled : filled + hi - lo] = batch.vectors[wanted[lo:hi] - offset]
        filled += hi - lo
        offset += len(batch)
        if filled == rows:
            break
    return out


def train_quantizer(db: str, sources: Sequence[VectorInput], config: IndexConfig, overwrite: bool) -> bool:
    """Trains and writes ``db/trained.faiss`` unless it already holds this very training.

    Returns:
        True when it was already complete (nothing written).

    Raises:
        OutputExistsError: A quantizer of another training is there and overwrite is False.
        OutputLockedError: Another run writes it.
    """
    import faiss

    target = os.path.join(db, manifest.TRAINED)
    identity = train_identity(sources, config)
    with OutputLock(target):
        if _trained_matches(db, identity):
            return True
        if os.path.exists(target) and not overwrite:
            raise OutputExistsError(f"{target} was trained on other inputs or options: add --overwrite to retrain "
                                    "it (every shard built on it must then be rebuilt)")  # fmt: skip
        rows = ann.train_rows(total_rows(sources), sources[0].hidden)
        log.info("training IVF-PQ (%s) on %d sampled vectors", identity["shape"], rows)
        index = ann.train_ivfpq(sample_vectors(sources, rows, config.seed), identity["shape"], config.seed)
        with storage.AtomicFile(target) as out:
            out.handle.write(faiss.serialize_index(index).tobytes())
        manifest.write_json(os.path.join(db, manifest.TRAINED_RECORD),
                            {"train": identity, "file": manifest.file_digest(target)})  # fmt: skip
    return False


def _trained_matches(db: str, identity: dict) -> bool:
    record_path = os.path.join(db, manifest.TRAINED_RECORD)
    target = os.path.join(db, manifest.TRAINED)
    if not (os.path.exists(record_path) and os.path.exists(target)):
        return False
    record = manifest.read_json(record_path)
    return record.get("train") == identity and record.get("file") == manifest.file_digest(target)


def require_trained(db: str, sources: Sequence[VectorInput], config: IndexConfig) -> str:
    """The digest of the quantizer a shard task builds on, checked to be trained on these very inputs.

    Raises:
        ConfigError: None was trained (the --train-only step is named), or one of other inputs or options.
    """
    target = os.path.join(db, manifest.TRAINED)
    if not os.path.exists(target):
        raise ConfigError(
            f"{target}: missing: the shards of an IVF-PQ database share one quantizer; train it first with the "
            "same inputs and --kind ivf-pq --train-only, then start the shard tasks"
        )
    if not _trained_matches(db, train_identity(sources, config)):
        raise ConfigError(f"{target} was trained on other inputs or options (or changed since): rerun the "
                          "--train-only step with these inputs, adding --overwrite")  # fmt: skip
    return manifest.read_json(os.path.join(db, manifest.TRAINED_RECORD))["file"]["sha256"]
