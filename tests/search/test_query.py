"""Query files: a FASTA embedded with the database's model or an esm2cli output read back, in batches; a query of
another identity refused before anything is written."""

from __future__ import annotations

import pandas as pd
import pytest

from esm2cli.config import IndexConfig
from esm2cli.errors import ConfigError, FastaError
from esm2cli.search.build import build_index
from esm2cli.search.index import Index
from esm2cli.search.query import is_output, search_file
from helpers import embed_cli
from searchdata import SEQUENCES


@pytest.fixture(scope="module")
def db(tmp_path_factory, embedded):
    folder = tmp_path_factory.mktemp("query") / "db"
    build_index([embedded / "out.parquet"], folder, IndexConfig(kind="flat", decoys=0))
    return Index.open(folder)


def _read(path):
    return pd.read_csv(path, sep="\t")


def test_a_fasta_and_its_output_give_the_same_hits_file(db, embedded, tmp_path):
    seen = []
    fasta = search_file(db, str(embedded / "in.fasta"), str(tmp_path / "f.tsv"), k=3,
                        embedder_options={"devices": "cpu"}, progress=seen.append)  # fmt: skip
    output = search_file(db, str(embedded / "out.parquet"), str(tmp_path / "o.tsv"), k=3)
    assert fasta.embedded and not output.embedded and fasta.queries == output.queries == len(SEQUENCES)
    assert sum(seen) == len(SEQUENCES)
    a, b = _read(tmp_path / "f.tsv"), _read(tmp_path / "o.tsv")
    assert a[["query", "target", "rank"]].equals(b[["query", "target", "rank"]])
    assert (a["score"] - b["score"]).abs().max() < 1e-5


def test_a_multi_layer_output_is_read_at_the_databases_layer(db, embedded, tmp_path, tiny_model_dir):
    both = tmp_path / "both.parquet"
    embed_cli(embedded / "in.fasta", both, tiny_model_dir, "--layers", "1,-1", check=True)
    search_file(db, str(both), str(tmp_path / "m.tsv"), k=2)
    search_file(db, str(embedded / "out.parquet"), str(tmp_path / "o.tsv"), k=2)
    assert _read(tmp_path / "m.tsv")["target"].tolist() == _read(tmp_path / "o.tsv")["target"].tolist()


def test_a_query_of_another_identity_or_a_bad_fasta_writes_nothing(db, embedded, tmp_path):
    with pytest.raises(ConfigError, match=r"bos.parquet: vectors of another model .*pooling"):
        search_file(db, str(embedded / "bos.parquet"), str(tmp_path / "x.tsv"), k=2)
    bad = tmp_path / "bad.fasta"
    bad.write_text(">a\nMKV1Z\n")
    with pytest.raises(FastaError):
        search_file(db, str(bad), str(tmp_path / "x.tsv"), k=2, embedder_options={"devices": "cpu"})
    with pytest.raises(ConfigError, match="-k 0"):
        search_file(db, str(embedded / "out.parquet"), str(tmp_path / "x.tsv"), k=0)
    assert not (tmp_path / "x.tsv").exists()


def test_outputs_are_told_from_fasta_by_name_or_folder(tmp_path):
    assert is_output("a.parquet") and is_output("x/b.H5") and is_output(str(tmp_path))
    assert not is_output("q.fasta") and not is_output("q.fa.gz") and not is_output("-")
