"""HDF5 output: one dataset per protein keyed by id, read back with h5py as bio_embeddings users read it."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_storage_shards import s3, s3_endpoint  # noqa: F401 - the moto server fixtures

from esm2cli import Embedder
from esm2cli.cli import cli
from esm2cli.io.hdf5 import PER_TOKEN_GROUP, id_of, key_of
from helpers import write_fasta

RECORDS = [
    ("sp|P69905|HBA_HUMAN", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF"),
    ("chain/A", "MKTAYIAKQRQISFVKSHFSRQ"),  # '/' would nest groups in HDF5
    ("100%", "GSHMLEDPV"),
    ("per_token", "MKV"),  # the name of the per-residue group
    (".", "W"),  # HDF5's name for the group itself
    ("long", "MSTNPKPQRKTKRNTNRRPQDVKFPGGGQIVGGVYLLPRRGPRLGVRATRKTSERSQPRGRRQPIPK"),
]


def embed(*args):
    return CliRunner().invoke(cli, ["embed", *map(str, args), "--dtype", "float32", "--devices", "cpu", "-q"])


@pytest.fixture
def fasta(tmp_path):
    return write_fasta(tmp_path / "in.fa", RECORDS)


def read_h5(path) -> dict:
    """What a bio_embeddings user does: every dataset at the root, with its attributes."""
    with h5py.File(path, "r") as f:
        return {key: (ds[()], dict(ds.attrs)) for key, ds in f.items() if key != PER_TOKEN_GROUP}


def test_keys_are_ids_reversibly_encoded():
    for rec_id in ["sp|P1|A", "a/b", "a%2Fb", "100%", ".", "per_token", "x.y", "..", "é/ü"]:
        key = key_of(rec_id)
        assert "/" not in key and key not in (".", PER_TOKEN_GROUP) and id_of(key) == rec_id
    assert key_of("sp|P69905|HBA_HUMAN") == "sp|P69905|HBA_HUMAN"  # ordinary ids are the keys
    assert len({key_of(i) for i in ["a/b", "a%2Fb", "a%252Fb"]}) == 3


@pytest.mark.parametrize("extra", [[], ["--per-token", "--layers", "1,-1", "--truncate", "40"]])
def test_hdf5_holds_the_parquet_rows(tmp_path, fasta, tiny_model_dir, extra):
    h5, parquet = tmp_path / "out.h5", tmp_path / "out.parquet"
    for out in (h5, parquet):
        result = embed(fasta, "-o", out, "-m", tiny_model_dir, *extra)
        assert result.exit_code == 0, result.output
    table = pq.read_table(parquet)
    got = read_h5(h5)
    assert [attrs["original_id"] for _, attrs in got.values()] == [r for r, _ in RECORDS]  # input order
    assert list(got) == [key_of(r) for r, _ in RECORDS]
    several = "--layers" in extra
    with h5py.File(h5, "r") as f:
        assert list(f.attrs["layers"]) == ([1, 3] if several else [3])
        assert f.attrs["model"] == tiny_model_dir and "identity" in f.attrs["esm2cli"]
        for row, (rec_id, seq) in enumerate(RECORDS):
            vector, attrs = got[key_of(rec_id)]
            assert attrs["length"] == len(seq) and attrs["description"] == ""
            assert bool(attrs["truncated"]) == (len(seq) > 40 and several) and attrs["windows"] == 1
            columns = ["embedding_l1", "embedding_l3"] if several else ["embedding"]
            want = np.stack([np.array(table[c][row].as_py(), np.float32) for c in columns])
            assert vector.dtype == np.float32 and vector.shape == ((2, 32) if several else (32,))
            np.testing.assert_array_equal(vector, want if several else want[0])
            if several:
                residues = f[PER_TOKEN_GROUP][key_of(rec_id)]
                assert residues.attrs["original_id"] == rec_id
                assert residues.shape == (2, min(len(seq), 40), 32)
                for k, c in enumerate(["per_token_l1", "per_token_l3"]):
                    np.testing.assert_array_equal(residues[k], np.array(table[c][row].as_py(), np.float32))
        assert (PER_TOKEN_GROUP in f) == several


def test_windows_attribute_in_window_mode(tmp_path, fasta, tiny_model_dir):
    out, parquet = tmp_path / "w.h5", tmp_path / "w.parquet"
    options = ["--long-sequences", "window", "--truncate", "30", "--window-overlap", "10"]
    for path in (out, parquet):
        assert embed(fasta, "-o", path, "-m", tiny_model_dir, *options).exit_code == 0
    got = read_h5(out)
    assert [int(attrs["windows"]) for _, attrs in got.values()] == pq.read_table(parquet)["windows"].to_pylist()
    assert max(int(attrs["windows"]) for _, attrs in got.values()) > 1


def test_rerun_is_complete_and_overwrite_replaces(tmp_path, fasta, tiny_model_dir):
    out = tmp_path / "out.h5"
    assert embed(fasta, "-o", out, "-m", tiny_model_dir).exit_code == 0
    before = out.stat().st_mtime_ns
    result = CliRunner().invoke(cli, ["embed", fasta, "-o", str(out), "-m", tiny_model_dir, "--dtype", "float32"])
    assert result.exit_code == 0 and "already complete" in result.output
    assert out.stat().st_mtime_ns == before
    result = embed(fasta, "-o", out, "-m", tiny_model_dir, "--layers", "1")
    assert result.exit_code == 2 and "made by another run" in result.output
    assert embed(fasta, "-o", out, "-m", tiny_model_dir, "--layers", "1", "--overwrite").exit_code == 0
    with h5py.File(out, "r") as f:
        assert list(f.attrs["layers"]) == [1]
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    result = embed(fasta, "-o", foreign, "-m", tiny_model_dir)
    assert result.exit_code == 2 and "not esm2cli output" in result.output
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_interrupted_run_resumes_into_hdf5(tmp_path, fasta, tiny_model_dir):
    from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig
    from esm2cli.errors import Interrupted
    from esm2cli.jobs.pipeline import embed_fasta

    out = tmp_path / "out.h5"
    configs = dict(model=ModelConfig(model=tiny_model_dir, dtype="float32", devices="cpu"), embed=EmbedConfig(),
                   batch=BatchConfig(chunk_size=2), inputs=InputConfig())  # fmt: skip

    def interrupt_after_four(total, residues=None):
        seen = [0]

        def update(rows, residues):
            seen[0] += rows
            if seen[0] >= 4:
                raise Interrupted(2)

        return update

    with pytest.raises(Interrupted):
        embed_fasta(fasta, out, progress_factory=interrupt_after_four, **configs)
    assert not out.exists() and len(list((tmp_path / "_out.h5.parts").glob("chunk-*.parquet"))) >= 2
    summary = embed_fasta(fasta, out, **configs)
    assert summary.resumed >= 4 and summary.sequences <= 2
    reference = tmp_path / "whole.h5"
    assert embed(fasta, "-o", reference, "-m", tiny_model_dir).exit_code == 0
    got, want = read_h5(out), read_h5(reference)
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_allclose(got[key][0], want[key][0], rtol=1e-5, atol=1e-6)


def test_shards_write_hdf5_parts_that_merge_into_one_file(tmp_path, fasta, tiny_model_dir):
    parts = tmp_path / "parts"
    for i in range(2):
        result = embed(fasta, "-o", parts, "-m", tiny_model_dir, "--shard-count", 2, "--shard-index", i, "--format",
                       "h5")  # fmt: skip
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000-of-00002.h5", "part-00001-of-00002.h5"]
    merged, single = tmp_path / "merged.h5", tmp_path / "single.h5"
    assert CliRunner().invoke(cli, ["merge", str(parts), "-o", str(merged)]).exit_code == 0
    assert embed(fasta, "-o", single, "-m", tiny_model_dir).exit_code == 0
    got, want = read_h5(merged), read_h5(single)
    assert list(got) == list(want) == [key_of(r) for r, _ in RECORDS]
    for key in want:
        np.testing.assert_allclose(got[key][0], want[key][0], rtol=1e-5, atol=1e-6)
        assert got[key][1]["original_id"] == want[key][1]["original_id"]
    result = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2 and "name an .h5 output" in result.output


def test_parquet_parts_merge_into_hdf5(tmp_path, fasta, tiny_model_dir):
    parts = tmp_path / "parts"
    for i in range(2):
        assert embed(fasta, "-o", parts, "-m", tiny_model_dir, "--shard-count", 2, "--shard-index", i).exit_code == 0
    merged = tmp_path / "merged.h5"
    result = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert [attrs["original_id"] for _, attrs in read_h5(merged).values()] == [r for r, _ in RECORDS]


def test_duplicate_ids_are_refused_before_any_compute(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "dup.fa", [("a", "MKV"), ("b", "GSH"), ("a", "MKVL")])
    result = embed(fa, "-o", tmp_path / "out.h5", "-m", tiny_model_dir, "--allow-duplicate-ids")
    assert result.exit_code == 2
    assert "HDF5 keys are the ids, and 1 id(s) occur more than once" in result.output
    assert "duplicate id 'a' (2 records)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.fa"]  # nothing computed or written


def test_missing_h5py_is_one_line(tmp_path, fasta, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    result = embed(fasta, "-o", tmp_path / "out.h5", "-m", tiny_model_dir)
    assert result.exit_code == 2
    assert "HDF5 output needs h5py, which is not installed: pip install h5py" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.h5").exists()
    assert embed(fasta, "-o", tmp_path / "out.parquet", "-m", tiny_model_dir).exit_code == 0  # Parquet needs none


def test_format_must_match_the_file_name(tmp_path, fasta, tiny_model_dir):
    result = embed(fasta, "-o", tmp_path / "out.parquet", "-m", tiny_model_dir, "--format", "h5")
    assert result.exit_code == 2 and "is not a .h5 file name" in result.output


def test_the_python_api_writes_hdf5(tmp_path, fasta, tiny_model_dir):
    out = tmp_path / "api.h5"
    with Embedder(tiny_model_dir, devices="cpu", dtype="float32") as embedder:
        embedder.embed_fasta(fasta, out)
        vectors = embedder.embed([seq for _, seq in RECORDS])
    got = read_h5(out)
    np.testing.assert_allclose(np.stack([v for v, _ in got.values()]), vectors, rtol=1e-5, atol=1e-6)


def test_hdf5_on_object_storage(tmp_path, fasta, tiny_model_dir, request):
    client, bucket = request.getfixturevalue("s3")  # a bucket on the moto server of test_storage_shards
    url = f"s3://{bucket}/emb/out.h5"
    assert embed(fasta, "-o", url, "-m", tiny_model_dir).exit_code == 0
    local = tmp_path / "down.h5"
    client.download_file(bucket, "emb/out.h5", str(local))
    assert [attrs["original_id"] for _, attrs in read_h5(local).values()] == [r for r, _ in RECORDS]
    result = CliRunner().invoke(cli, ["embed", fasta, "-o", url, "-m", tiny_model_dir, "--dtype", "float32"])
    assert result.exit_code == 0 and "already complete" in result.output  # its metadata read from the bucket
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["emb/out.h5"]  # no chunks or temporary files left


def test_contacts_into_hdf5_are_refused_before_any_compute(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAKQRQISF"), ("p2", "GGSSLLKKVVAA")])
    out = tmp_path / "o.h5"
    result = CliRunner().invoke(
        cli, ["embed", fasta, "-o", str(out), "-m", tiny_model_dir, "--devices", "cpu", "--contacts"]
    )
    assert result.exit_code == 2, result.output  # docs/output-format.md: HDF5 outputs hold no contact maps
    assert f"{out}: --contacts is written to Parquet outputs only" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fa"]  # no output, no chunks
