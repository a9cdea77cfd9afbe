"""The Python API: Embedder gives the CLI's numbers, in memory, streamed, or into the CLI's file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli import Embedder
from esm2cli.cli import cli
from esm2cli.errors import ConfigError, EngineError, FastaError, InputError
from esm2cli.jobs.workload import synthetic_sequences
from helpers import fed_fifo, within, write_fasta
from reference import DirectReference

OPTIONS = dict(devices="cpu", dtype="float32")


@pytest.fixture(scope="module")
def records():
    return list(synthetic_sequences(30, seed=4, max_length=1100))  # a few over 1022 residues: truncated


@pytest.fixture(scope="module")
def fasta(tmp_path_factory, records) -> str:
    return write_fasta(tmp_path_factory.mktemp("api") / "in.fa", records)


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    with Embedder(tiny_model_dir, **OPTIONS) as emb:
        yield emb


@pytest.fixture(scope="module")
def cli_table(tmp_path_factory, fasta, tiny_model_dir):
    out = tmp_path_factory.mktemp("cli") / "out.parquet"
    result = CliRunner().invoke(
        cli, ["embed", fasta, "-o", str(out), "-m", tiny_model_dir, "--dtype", "float32", "--devices", "cpu", "-q"]
    )
    assert result.exit_code == 0, result.output
    return pq.read_table(out)


def vectors(table, column="embedding") -> np.ndarray:
    return np.array(table[column].to_pylist(), dtype=np.float32)


def assert_same_table(table, cli_table):
    """The CLI's rows and metadata; embeddings equal up to the rounding of another batch composition."""
    assert table.schema.metadata == cli_table.schema.metadata  # the same run identity and options
    for column in ("id", "description", "length", "truncated"):
        assert table[column].to_pylist() == cli_table[column].to_pylist()
    np.testing.assert_allclose(vectors(table), vectors(cli_table), rtol=1e-5, atol=1e-6)


def test_embed_gives_the_cli_numbers(embedder, records, cli_table):
    got = embedder.embed([seq for _, seq in records])
    assert got.shape == (30, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, vectors(cli_table), rtol=1e-5, atol=1e-6)


def test_embed_agrees_with_transformers_directly(embedder, tiny_model_dir, records):
    direct = DirectReference(tiny_model_dir)
    seqs = [seq[:200] for _, seq in records[:5]]
    np.testing.assert_allclose(embedder.embed(seqs), np.stack([direct.mean(s) for s in seqs]), rtol=1e-4, atol=1e-5)


def test_embed_fasta_returns_the_cli_table(embedder, fasta, cli_table):
    table = embedder.embed_fasta(fasta)
    assert table.schema.equals(cli_table.schema)
    assert_same_table(table, cli_table)
    assert sum(table["truncated"].to_pylist()) > 0


def test_embed_fasta_writes_the_cli_file_with_the_loaded_model(embedder, fasta, cli_table, tmp_path, monkeypatch):
    import esm2cli.jobs.pipeline

    def no_second_load(*args, **kwargs):
        raise AssertionError("the Embedder's model must be reused, not loaded again")

    monkeypatch.setattr(esm2cli.jobs.pipeline, "build_engine", no_second_load)
    out = tmp_path / "api.parquet"
    summary = embedder.embed_fasta(fasta, out)
    assert summary.sequences == 30
    assert_same_table(pq.read_table(out), cli_table)
    assert embedder.embed_fasta(fasta, out).already_complete  # a rerun, as the CLI's
    assert embedder.embed("MKV").shape == (32,)  # the engine is still running


def test_embed_fasta_reads_a_fifo_once(embedder, fasta, cli_table, tmp_path):
    data = Path(fasta).read_bytes()
    fed_fifo(tmp_path / "in.fifo", data)
    table = within(120, embedder.embed_fasta, tmp_path / "in.fifo")  # read twice, the second open waited forever
    assert table["id"].to_pylist() == cli_table["id"].to_pylist()
    np.testing.assert_allclose(vectors(table), vectors(cli_table), rtol=1e-5, atol=1e-6)
    fed_fifo(tmp_path / "again.fifo", data)
    summary = within(120, embedder.embed_fasta, tmp_path / "again.fifo", tmp_path / "o.parquet")
    assert summary.sequences == 30
    np.testing.assert_array_equal(vectors(pq.read_table(tmp_path / "o.parquet")), vectors(table))


def test_several_layers_give_a_dict_by_layer_number(tiny_model_dir, records):
    with Embedder(tiny_model_dir, layers=[np.int64(1), -1], **OPTIONS) as emb:
        out = emb.embed([seq for _, seq in records[:4]])
        assert emb.layers == (1, 3)
    assert sorted(out) == [1, 3] and out[1].shape == out[3].shape == (4, 32)
    assert not np.allclose(out[1], out[3])


def test_a_single_string_gives_one_vector(embedder, records):
    seq = records[0][1][:100]
    np.testing.assert_array_equal(embedder.embed(seq), embedder.embed([seq, "MKV"])[0])
    assert embedder.embed([]).shape == (0, 32)


def test_embed_iter_streams_in_chunks_and_reads_lazily(tiny_model_dir):
    pulled = []

    def sequences():
        for i, (_, seq) in enumerate(synthetic_sequences(60, seed=8, max_length=120)):
            pulled.append(i)
            yield seq

    with Embedder(tiny_model_dir, chunk_size=4, **OPTIONS) as emb:
        stream = emb.embed_iter(sequences())
        first = next(stream)
        assert first.shape == (4, 32)
        assert len(pulled) <= 24  # a few chunks ahead at most, not the whole input
        rest = list(stream)
        whole = emb.embed([seq for _, seq in synthetic_sequences(60, seed=8, max_length=120)])
    assert [len(c) for c in rest] == [4] * 14
    np.testing.assert_allclose(np.concatenate([first, *rest]), whole, rtol=1e-5, atol=1e-6)


def test_stopping_an_iterator_early_leaves_the_embedder_usable(tiny_model_dir, fasta):
    with Embedder(tiny_model_dir, chunk_size=3, **OPTIONS) as emb:
        for batch in emb.iter_fasta(fasta):
            assert batch.num_rows == 3
            break
        assert emb.embed_fasta(fasta).num_rows == 30


def test_bad_sequences_are_named_by_index(embedder):
    with pytest.raises(InputError, match=r"sequences\[1\]: character\(s\) outside the ESM-2 alphabet: 'J'"):
        embedder.embed(["MKV", "MKJV"])
    with pytest.raises(InputError, match=r"sequences\[0\]: empty sequence"):
        embedder.embed([" "])
    with pytest.raises(InputError, match=r"sequences\[2\]: expected a string, got int"):
        embedder.embed(["MKV", "A", 5])
    assert embedder.embed([" mkv* "]).shape == (1, 32)  # normalised as FASTA records are


@pytest.mark.parametrize(
    "given, message",
    [
        ({"KRAS": "MTEYKLVVVG", "MYC": "MPLNVSF"}, r"got a dict \(a mapping\): iterating it would embed its keys"),
        (b"MKTA", r"got bytes; decode it"),
        (bytearray(b"MKTA"), r"got bytearray; decode it"),
        (None, r"expected a string or an iterable of strings, got NoneType"),
        (7, r"expected a string or an iterable of strings, got int"),
        ([b"MKTA"], r"sequences\[0\]: expected a string, got bytes; decode it"),
    ],
)
def test_inputs_that_are_not_sequences_are_input_errors_naming_what_was_given(embedder, given, message):
    with pytest.raises(InputError, match=message):
        embedder.embed(given)
    with pytest.raises(InputError, match=message):
        list(embedder.embed_iter(given))


def test_fasta_checks_are_the_clis(embedder, tmp_path):
    bad = write_fasta(tmp_path / "bad.fa", [("a", "MKV"), ("a", "GSH"), ("b", "MK1")])
    with pytest.raises(FastaError, match="cannot be embedded"):
        embedder.embed_fasta(bad)
    table = embedder.embed_fasta(bad, skip_invalid=True, allow_duplicate_ids=True)
    assert table["id"].to_pylist() == ["a", "a"]


def test_options_and_lifecycle(tiny_model_dir):
    with pytest.raises(ConfigError, match="long_sequences='slide' is not available"):
        Embedder(tiny_model_dir, long_sequences="slide", **OPTIONS)
    with pytest.raises(ConfigError, match="layer 9 is out of range"):
        Embedder(tiny_model_dir, layers=9, **OPTIONS)
    with Embedder(tiny_model_dir, **OPTIONS) as emb:
        assert emb.devices == ["cpu"] and emb.dtype == "float32" and emb.hidden_size == 32
    with pytest.raises(EngineError, match="closed"):
        emb.embed(["MKV"])


def test_long_sequences_as_the_cli(tiny_model_dir, fasta, tmp_path):
    options = ["--long-sequences", "window", "--truncate", "300", "--window-overlap", "50"]
    out = tmp_path / "window.parquet"
    result = CliRunner().invoke(
        cli, ["embed", fasta, "-o", str(out), "-m", tiny_model_dir, "--dtype", "float32", "--devices", "cpu", *options]
    )
    assert result.exit_code == 0, result.output
    with Embedder(tiny_model_dir, long_sequences="window", truncate=300, window_overlap=50, **OPTIONS) as emb:
        table = emb.embed_fasta(fasta)
    cli_table = pq.read_table(out)
    assert max(table["windows"].to_pylist()) > 1 and not any(table["truncated"].to_pylist())
    assert table["windows"].to_pylist() == cli_table["windows"].to_pylist()
    assert_same_table(table, cli_table)
    with Embedder(tiny_model_dir, long_sequences="error", truncate=40, **OPTIONS) as emb:
        with pytest.raises(InputError, match=r"sequences\[1\]: 41 residues, longer than 40"):
            emb.embed(["M" * 40, "M" * 41])
    with pytest.raises(ConfigError):
        Embedder(tiny_model_dir, long_sequences="window", truncate=100, window_overlap=100, **OPTIONS)


def test_layers_as_the_cli_writes_them(tiny_model_dir):
    with Embedder(tiny_model_dir, layers="1,-1", **OPTIONS) as emb:
        assert sorted(emb.embed(["MKV"])) == [1, 3]
    with Embedder(tiny_model_dir, layers=[1], **OPTIONS) as emb:
        assert emb.embed(["MKV"]).shape == (1, 32)  # one layer asked: an array
    with pytest.raises(ConfigError, match="not a comma-separated list of integers"):
        Embedder(tiny_model_dir, layers="x", **OPTIONS)


@pytest.mark.parametrize("devices", ["sim:2"])  # two worker threads
def test_a_script_that_never_closes_its_embedder_exits(tiny_model_dir, devices):

    script = (
        "from esm2cli import Embedder\n"
        f"emb = Embedder({tiny_model_dir!r}, devices={devices!r}, dtype='float32')\n"
        "print(emb.embed(['MKV', 'GSHM']).shape)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter hung at exit with an Embedder left open")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("(2, ")


def test_embed_refuses_a_dataframe(embedder):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"sequence": ["MKTAYIAKQR", "GSHMLEDPV", "MKV"]})
    # Iterating a DataFrame yields its column labels, as iterating a dict yields its keys (which is refused).
    with pytest.raises(InputError, match="DataFrame"):
        embedder.embed(frame)


def test_embed_of_a_zero_dimensional_array_is_one_sequence_or_input_error(embedder):
    try:
        vector = embedder.embed(np.array("MKTAYIAKQR"))
    except InputError:
        return
    assert vector.shape == (embedder.hidden_size,)


def test_embed_fasta_to_a_file_after_close_leaves_nothing(tiny_model_dir, tmp_path):
    from esm2cli import Embedder

    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    embedder = Embedder(tiny_model_dir, devices="cpu", dtype="float32")
    embedder.close()
    with pytest.raises(EngineError):
        embedder.embed_fasta(fasta, tmp_path / "out.parquet")
    left = sorted(p.name for p in Path(tmp_path).iterdir() if not re.fullmatch(r"in\.fa", p.name))
    assert left == [], left


def test_index_is_the_search_database_imported_on_first_use():
    import esm2cli
    from esm2cli.search.index import Index as SearchIndex

    assert "Index" in esm2cli.__all__ and esm2cli.Index is SearchIndex
    code = "import sys, esm2cli; print('esm2cli.search.index' in sys.modules, 'faiss' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert run.stdout.split() == ["False", "False"], run.stderr


def test_index_searches_sequences_in_a_notebook_as_the_docs_show(tmp_path, tiny_model_dir):
    from esm2cli import Index
    from helpers import embed_cli, random_protein

    records = [(f"t{i}", random_protein(25 + 6 * i)) for i in range(8)]
    embed_cli(write_fasta(tmp_path / "db.fasta", records), tmp_path / "db.parquet", tiny_model_dir, check=True)
    built = CliRunner().invoke(cli, ["index", str(tmp_path / "db.parquet"), "-o", str(tmp_path / "db"), "-q",
                                     "--decoys", "0"])  # fmt: skip
    assert built.exit_code == 0, built.output
    index = Index.open(tmp_path / "db")
    with index.embedder(devices="cpu") as embedder:
        hits = index.search_sequences([records[5][1], records[2][1]], k=3, embedder=embedder)
        stored = embedder.embed([records[5][1]])
        with pytest.raises(ConfigError, match="-k 9: the database"):
            index.search_sequences(["MKV"], k=9, embedder=embedder)
    assert [row[0].target for row in hits] == ["t5", "t2"] and all(len(row) == 3 for row in hits)
    assert [h.rank for h in hits[0]] == [1, 2, 3] and hits[0][0].evalue is None
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.target for h in index.search_vectors(stored, k=3)[0]] == [h.target for h in hits[0]]
