"""The server's cache of recent embeddings: the same sequence asked again is answered without the engine."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

import numpy as np

from esm2cli.config import EmbedConfig


class EmbeddingCache:
    """The pooled vectors of the last ``size`` distinct sequences, least recently used leaving first.

    Keyed by the SHA-256 of the sequence as embedded (after truncation; whole in window mode) and of
    the options that decide its numbers, so that a key never answers for other options. An answer from
    the cache is the vectors computed for that sequence earlier, bit for bit.

    Args:
        size: Entries at most; 0 turns the cache off.
        embed: The options the server embeds with (one server, one set of options).
        model: What names the weights (the model and its dtype).
    """

    def __init__(self, size: int, embed: EmbedConfig, model: str):
        self.size = size
        options = {"model": model, "layers": list(embed.layers), "pooling": embed.pooling, "truncate": embed.truncate,
                   "long_sequences": embed.long_sequences, "window_overlap": embed.window_overlap}  # fmt: skip
        self._options = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).digest()
        self._entries: OrderedDict[bytes, dict[int, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _key(self, sequence: str) -> bytes:
        return hashlib.sha256(self._options + sequence.encode("ascii", "replace")).digest()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sequence: str) -> dict[int, np.ndarray] | None:
        """The vectors of a sequence (as embedded) by layer, or None; counts a hit or a miss."""
        if not self.size:
            return None
        key = self._key(sequence)
        with self._lock:
            row = self._entries.get(key)
            if row is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return row

    def put(self, sequence: str, row: dict[int, np.ndarray]) -> None:
        """Keeps a sequence's vectors (copied: a row may be a view of a whole batch's matrix)."""
        if not self.size:
            return
        kept = {layer: np.array(vector, dtype=np.float32, copy=True) for layer, vector in row.items()}
        key = self._key(sequence)
        with self._lock:
            self._entries[key] = kept
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
