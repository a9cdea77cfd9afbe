"""Fixtures of the search tests: one real tiny embed output (its metadata labels the synthetic inputs), synthetic
outputs of that identity, and the null model's stand-in (searchdata.fake_null_module)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import esm2cli.search
from helpers import embed_mean_and_bos, write_like
from searchdata import SEQUENCES, fake_null_module


@pytest.fixture(scope="session")
def embedded(tmp_path_factory, tiny_model_dir):
    """A FASTA and its tiny-model output (float32, mean pooling, last layer), and one of bos pooling."""
    return embed_mean_and_bos(tmp_path_factory.mktemp("embedded"), SEQUENCES, tiny_model_dir)


@pytest.fixture
def synthetic(embedded, tmp_path):
    """write(name, vectors, **kw): an esm2cli output of the tiny model's identity holding these vectors."""

    def write(name: str, vectors: np.ndarray, **kwargs) -> str:
        return write_like(embedded / "out.parquet", tmp_path / name, vectors, **kwargs)

    return write


@pytest.fixture
def fake_null(monkeypatch):
    """esm2cli.search.null replaced by fake_null_module() for one test."""
    module = fake_null_module()
    monkeypatch.setitem(sys.modules, "esm2cli.search.null", module)
    # `from esm2cli.search import null` reads the package's attribute first, set once the real one is imported.
    monkeypatch.setattr(esm2cli.search, "null", module, raising=False)
    return module
