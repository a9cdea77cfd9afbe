"""Data of the search tests: unit and clustered vectors, a damaged Parquet page, and a stand-in for the null model
where the E-value plumbing is what a test checks."""

from __future__ import annotations

import importlib.machinery
import json
import types

import numpy as np
import pyarrow.parquet as pq

from helpers import random_protein

SEQUENCES = [(f"p{i}", random_protein(20 + 9 * i)) for i in range(12)]  # the FASTA of the embedded fixture


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered(n: int, seed: int = 0, centers: int = 40, spread: float = 0.35, hidden: int = 32) -> np.ndarray:
    """Unit vectors around a few random centres: the neighbourhoods an approximate index must find."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centers, hidden))
    return unit(middle[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, hidden)))


def flip_middle(path, column: str = "embedding", row_group: int = 0) -> None:
    """Inverts 8 bytes in the middle of one column's data in one row group: the page still decodes, its checksum
    fails."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    columns = [meta.column(i) for i in range(meta.num_columns)]
    (chunk,) = [c for c in columns if c.path_in_schema.split(".")[0] == column]
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    data = bytearray(open(path, "rb").read())
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    open(path, "wb").write(bytes(data))


def fake_null_module() -> types.ModuleType:
    """A module of esm2cli.search.null's interface: decoys are fixed proteins; the model remembers the best decoy
    score it was fitted on, and E = targets x exp(-20 (score - that))."""
    module = types.ModuleType("esm2cli.search.null")
    module.__spec__ = importlib.machinery.ModuleSpec("esm2cli.search.null", None)
    module.DECOY_TOP_K = 5
    module.MIN_DECOYS = 1
    module.fits = []

    class NullModel:
        def __init__(self, best: float, description: str):
            self.best, self.description = best, description

        def evalue(self, scores, targets):
            return targets * np.exp(-20.0 * (np.asarray(scores, np.float64) - self.best))

        def to_json(self):
            return {"best": self.best, "description": self.description}

        @classmethod
        def from_json(cls, record):
            return cls(record["best"], record["description"])

    def decoy_sequences(db_inputs, fasta, count, seed):
        return [random_protein(30 + 3 * i) for i in range(count)], f"{count} fixed test decoys"

    def fit_null(decoy_scores, targets, description):
        module.fits.append((np.array(decoy_scores), targets))
        return NullModel(float(np.max(decoy_scores)), description)

    module.NullModel, module.decoy_sequences, module.fit_null = NullModel, decoy_sequences, fit_null
    return module


def read_json(path) -> dict:
    with open(path) as handle:
        return json.load(handle)
