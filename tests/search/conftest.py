"""Fixtures of the search tests: one real tiny embed output (its metadata labels the synthetic inputs), synthetic
outputs of that identity, and the null model's stand-in (searchdata.fake_null_module)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import esm2cli.search
from helpers import embed_cli, write_fasta, write_like
from searchdata import SEQUENCES, fake_null_module


@pytest.fixture(scope="session")
def embedded(tmp_path_factory, tiny_model_dir):
    """A FASTA and its tiny-model output (float32, mean pooling, last layer), and one of bos pooling."""
    root = tmp_path_factory.mktemp("embedded")
    fasta = write_fasta(root / "in.fasta", SEQUENCES)
    embed_cli(fasta, root / "out.parquet", tiny_model_dir, check=True)
    embed_cli(fasta, root / "bos.parquet", tiny_model_dir, "--pooling", "bos", check=True)
    return root


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
