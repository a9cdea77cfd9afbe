"""An open database: queries of its own identity only, sequences embedded with its own model, k in range."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from esm2cli.api import Embedder
from esm2cli.config import IndexConfig
from esm2cli.errors import ConfigError
from esm2cli.search.build import build_index
from esm2cli.search.index import Index, embedder_identity, embedder_options
from esm2cli.search.vectors import open_inputs
from searchdata import SEQUENCES


@pytest.fixture(scope="module")
def db(tmp_path_factory, embedded):
    folder = tmp_path_factory.mktemp("index") / "db"
    build_index([embedded / "out.parquet"], folder, IndexConfig(kind="flat", decoys=0))
    return Index.open(folder)


def test_the_database_records_its_inputs_identity_and_metadata(db, embedded, tiny_model_dir):
    (source,) = open_inputs([embedded / "out.parquet"])
    assert db.identity == source.identity and db.metadata["model"] == tiny_model_dir
    assert db.size == len(SEQUENCES) and db.hidden == 32 and db.kind == "flat"


def test_a_fasta_query_gives_the_hits_of_its_output_used_as_query(db, embedded):
    table = pq.read_table(embedded / "out.parquet")
    stored = np.array(table.column("embedding").to_pylist(), np.float32)
    from_output = db.search_vectors(stored, 5)
    from_sequences = db.search_sequences([seq for _, seq in SEQUENCES], 5)
    assert [[h.target for h in row] for row in from_sequences] == [[h.target for h in row] for row in from_output]
    for a, b in zip(from_sequences, from_output, strict=True):
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-6)
    assert [row[0].target for row in from_output] == [name for name, _ in SEQUENCES]  # each finds itself first
    assert [h.rank for h in from_output[0]] == [1, 2, 3, 4, 5] and from_output[0][0].length == len(SEQUENCES[0][1])


def test_the_embedder_is_configured_from_the_identity(db, tiny_model_dir):
    options = embedder_options(db.identity, db.metadata)
    assert options["model"] == tiny_model_dir and options["dtype"] == "float32" and options["pooling"] == "mean"
    assert options["layers"] == [3] and options["load_format"] == "auto"
    with db.embedder(devices="cpu") as embedder:  # the Embedder's own identity is the inputs' vector identity
        assert embedder_identity(embedder) == db.identity


def test_a_query_of_another_identity_is_refused_naming_what_differs(db, embedded, tiny_model_dir):
    (bos,) = open_inputs([embedded / "bos.parquet"])
    with pytest.raises(ConfigError, match=r"bos.parquet: vectors of another model .*pooling was 'mean', now 'bos'"):
        db.check_query_identity(bos.identity, bos.path)
    with pytest.raises(ConfigError, match=r"dtype was 'float32', now 'bfloat16'"):
        db.embedder(devices="cpu", dtype="bfloat16")
    with Embedder(tiny_model_dir, devices="cpu", dtype="float32", layers=1) as other:
        assert embedder_identity(other)["layer"] == 1
        with pytest.raises(ConfigError, match=r"the embedder given: .*layer was 3, now 1"):
            db.search_sequences(["MKV"], 1, embedder=other)


def test_k_and_the_query_width_are_checked(db):
    vectors = np.ones((2, 32), np.float32)
    for k in (0, len(SEQUENCES) + 1):
        with pytest.raises(ConfigError, match=rf"-k {k}: the database .* holds 12 vectors: ask for 1 to 12"):
            db.search_vectors(vectors, k)
    with pytest.raises(ConfigError, match=r"shape \(2, 16\).* holds 32"):
        db.search_vectors(np.ones((2, 16), np.float32), 1)


def test_min_score_cuts_the_tail(db):
    vectors = np.linspace(-1, 1, 32, dtype=np.float32)[None, :]
    full = db.search_vectors(vectors, 12)[0]
    cut = db.search_vectors(vectors, 12, min_score=full[5].score)[0]
    assert [h.target for h in cut] == [h.target for h in full[:6]]
