"""A run's identity covers every header byte: a rerun after an edit of descriptions only is not 'already
complete', and chunks committed before the edit are recomputed, so no stale `description` is kept."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.io.chunks import ChunkStore
from esm2cli.io.records import Record, hash_records

SEQS = ["MKTAYIAKQRQ", "GSHMLEDPV", "MVLSPADKTNV", "MKVLAW", "WWPPGG", "ACDEFGHIK"]


def write(path, descriptions):
    path.write_text("".join(f">p{i} {d}\n{s}\n" for i, (s, d) in enumerate(zip(SEQS, descriptions, strict=True))))
    return str(path)


def embed(fasta, out, model, *extra):
    args = ["embed", fasta, "-o", str(out), "-m", model, "--dtype", "float32", "--devices", "cpu", *extra]
    return CliRunner().invoke(cli, args)


def test_the_record_hash_covers_the_description():
    plain = Record(id="p1", description="old", sequence="MKV", position=1)
    edited = Record(id="p1", description="new", sequence="MKV", position=1)
    assert hash_records([plain]) != hash_records([edited])


def test_a_description_edit_makes_a_complete_output_stale(tmp_path, tiny_model_dir):
    out = tmp_path / "out.parquet"
    fa = write(tmp_path / "in.fa", ["old"] * len(SEQS))
    assert embed(fa, out, tiny_model_dir).exit_code == 0
    again = embed(fa, out, tiny_model_dir)
    assert again.exit_code == 0 and "already complete" in again.output  # the control: nothing changed
    write(tmp_path / "in.fa", ["old", "old", "new header", "old", "old", "old"])
    refused = embed(fa, out, tiny_model_dir)
    assert refused.exit_code == 2, refused.output
    assert "the input's content changed" in refused.output and "already complete" not in refused.output
    assert pq.read_table(out)["description"].to_pylist() == ["old"] * len(SEQS)  # left as it was
    redone = embed(fa, out, tiny_model_dir, "--overwrite")
    assert redone.exit_code == 0 and "already complete" not in redone.output, redone.output
    assert pq.read_table(out)["description"].to_pylist() == ["old", "old", "new header", "old", "old", "old"]


def test_chunks_committed_before_a_description_edit_are_recomputed(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out.parquet"
    fa = write(tmp_path / "in.fa", ["old"] * len(SEQS))
    with monkeypatch.context() as patch:  # the first run stops after its last chunk, before the merge
        patch.setattr(ChunkStore, "commit", lambda self, chunks, rows: None)
        assert embed(fa, out, tiny_model_dir, "--chunk-size", "2").exit_code == 0
    work = tmp_path / "_out.parquet.parts"
    assert not out.exists() and len(list(work.glob("chunk-*.parquet"))) == 3
    write(tmp_path / "in.fa", ["old", "old", "new header", "old", "old", "old"])
    rerun = embed(fa, out, tiny_model_dir, "--chunk-size", "2")
    assert rerun.exit_code == 0, rerun.output
    assert "1 chunk(s) of an earlier run no longer match the input: recomputed" in rerun.output
    assert "4 resumed" in rerun.output.replace(",", "")
    table = pq.read_table(out)
    assert table["id"].to_pylist() == [f"p{i}" for i in range(len(SEQS))]
    assert table["description"].to_pylist() == ["old", "old", "new header", "old", "old", "old"]
    assert not work.exists()


@pytest.mark.parametrize("edit", ["id", "sequence"])
def test_other_edits_change_the_hash_too(edit):
    base = dict(id="p1", description="d", sequence="MKV", position=1)
    assert hash_records([Record(**base)]) != hash_records([Record(**{**base, edit: "MKW"})])
