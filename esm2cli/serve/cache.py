"""The server's cache of recent embeddings: the same sequence asked again is answered without the engine.

The cache is partitioned by API key: a key's repeated request is answered from its own entries, never
from another key's, so that a key holder cannot tell from an answer's speed (or from /metrics) which
sequences another client sent. Each partition holds up to ``size`` entries and keeps its own counts.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from esm2cli.config import EmbedConfig
from esm2cli.io.identity import identity_digest, request_identity

OPEN_PARTITION = b""  # the one partition of a server without API keys (and of requests that carry none)


def cache_identity(*, weights: str, dtype: str, embed: EmbedConfig, model_family: str) -> bytes:
    """What a cached vector depends on besides its sequence: the identity a row of ``esm2cli embed`` with the same
    weights and options records (esm2cli.io.identity.request_identity), so that an option added there is in the
    cache's key at once. ``truncate`` is in it although the sequence is keyed after truncation: in window mode
    the whole protein is the key, and its vectors are stitched from windows of ``truncate`` residues.

    Args:
        weights: The weights loaded, as WeightsStamp.confirm names them.
        dtype: The dtype they run in (resolved).
        embed: The server's options.
        model_family: The loaded model's family ("esm2", "esmc"), as an embed row records it.
    """
    return identity_digest(request_identity(weights=weights, dtype=dtype, embed=embed, model_family=model_family))


@dataclass(frozen=True)
class CacheStats:
    """One partition's counts: sequences answered from the cache, looked up and computed, and held."""

    hits: int = 0
    misses: int = 0
    entries: int = 0


@dataclass
class _Partition:
    entries: OrderedDict[bytes, dict[int, np.ndarray]] = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0


class EmbeddingCache:
    """The pooled vectors of the last ``size`` distinct sequences of each partition, least recently used leaving first.

    Keyed by the SHA-256 of the sequence as embedded (after truncation; whole in window mode) and of
    ``identity`` (cache_identity: the weights, the dtype and the options), so that a key never answers for
    other weights or options. An answer from the cache is the vectors computed for that sequence earlier, bit for bit.
    A partition (the digest of an API key, or OPEN_PARTITION) sees only its own entries; one partition
    filling up evicts only its own.

    Args:
        size: Entries at most per partition; 0 turns the cache off.
        identity: What the vectors depend on besides the sequence (cache_identity).
    """

    def __init__(self, size: int, identity: bytes):
        self.size = size
        self._identity = identity
        self._partitions: dict[bytes, _Partition] = {}
        self._lock = threading.Lock()

    def key(self, sequence: str) -> bytes:
        """The entry key of a sequence (as embedded) under this cache's identity."""
        return hashlib.sha256(self._identity + sequence.encode("ascii", "replace")).digest()

    def __len__(self) -> int:
        """Entries held, over every partition (memory: entries x layers x hidden x 4 bytes)."""
        with self._lock:
            return sum(len(p.entries) for p in self._partitions.values())

    def get(self, partition: bytes, sequence: str) -> dict[int, np.ndarray] | None:
        """The vectors of a sequence (as embedded) by layer, or None; counts a hit or a miss in ``partition``."""
        if not self.size:
            return None
        key = self.key(sequence)
        with self._lock:
            part = self._partitions.setdefault(partition, _Partition())
            row = part.entries.get(key)
            if row is None:
                part.misses += 1
                return None
            part.entries.move_to_end(key)
            part.hits += 1
            return row

    def put(self, partition: bytes, sequence: str, row: dict[int, np.ndarray]) -> None:
        """Keeps a sequence's vectors in ``partition`` (copied: a row may be a view of a whole batch's matrix)."""
        if not self.size:
            return
        kept = {layer: np.array(vector, dtype=np.float32, copy=True) for layer, vector in row.items()}
        key = self.key(sequence)
        with self._lock:
            entries = self._partitions.setdefault(partition, _Partition()).entries
            entries[key] = kept
            entries.move_to_end(key)
            while len(entries) > self.size:
                entries.popitem(last=False)

    def stats(self, partition: bytes) -> CacheStats:
        """The counts of one partition only: what its own key holder may see."""
        with self._lock:
            part = self._partitions.get(partition)
            return CacheStats(part.hits, part.misses, len(part.entries)) if part else CacheStats()
