"""Outputs that cannot be opened or written: one line, exit 1, no temporary file, an earlier output kept.

A full disk is made without root: RLIMIT_FSIZE caps how large a file this process may grow (Python
ignores SIGXFSZ, so the write fails with EFBIG as it would with ENOSPC). A signal while an output is being
opened is a KeyboardInterrupt raised by the Parquet writer's constructor.
"""

from __future__ import annotations

import resource
from contextlib import contextmanager

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.io import parquet, schema, storage
from esm2cli.jobs import scoring
from helpers import write_fasta

WT = [("p1", "MKTAYIAKQRQISFVKSHFSRQ" * 8), ("p2", "GSHMKVLAAGIVGL" * 8)]


@contextmanager
def file_size_cap(nbytes: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def score(model, fasta, out, *extra):
    args = ["score", str(fasta), "--all-substitutions", "--method", "wt-marginal", "-o", str(out), "-m", model,
            "--dtype", "float32", "--devices", "cpu", *extra]  # fmt: skip
    return CliRunner().invoke(cli, args)


def files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("row_group_rows", [8, scoring.ROW_GROUP_ROWS], ids=["while-writing", "at-commit"])
def test_score_on_a_full_disk_is_one_line_and_keeps_the_earlier_output(tmp_path, tiny_model_dir, monkeypatch,
                                                                       row_group_rows):  # fmt: skip
    fasta = write_fasta(tmp_path / "wt.fa", WT)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "dms.parquet"
    out.write_bytes(b"an earlier output")
    monkeypatch.setattr(scoring, "ROW_GROUP_ROWS", row_group_rows)
    with file_size_cap(16 << 10):  # the table is ~19 x 300 rows: well over 16 kB
        result = score(tiny_model_dir, fasta, out, "--overwrite")
    assert result.exit_code == 1, (result.output, result.exception)
    assert f"cannot write {out}: File too large" in result.output and "Traceback" not in result.output
    assert files(out_dir) == ["dms.parquet"] and out.read_bytes() == b"an earlier output"
    again = score(tiny_model_dir, fasta, out, "--overwrite")  # the control: with room, the same run succeeds
    assert again.exit_code == 0, again.output
    assert pq.read_table(out).num_rows == 19 * sum(len(s) for _, s in WT)


def test_score_to_an_output_that_cannot_be_opened_is_one_line(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "wt.fa", WT[:1])
    (tmp_path / "plain-file").write_text("not a directory")
    result = score(tiny_model_dir, fasta, tmp_path / "plain-file" / "dms.parquet")
    assert result.exit_code in (1, 2) and "plain-file" in result.output, (result.output, result.exception)
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert files(tmp_path) == ["plain-file", "wt.fa"]


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # what SIGINT raises, here while the output is being opened


def test_a_signal_while_a_score_output_is_opened_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(parquet.pq, "ParquetWriter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        parquet.TableWriter(str(tmp_path / "dms.parquet"), scoring._schema("pll", {}))
    assert files(tmp_path) == []


def test_a_signal_while_a_chunk_or_the_merged_output_is_opened_leaves_no_file(tmp_path, monkeypatch):
    table_schema = schema.build_schema(4, (6,), False, {})
    rows = schema.Rows(["a"], [""], [3], [False], {6: np.zeros((1, 4), np.float32)}, {})
    source = parquet.EmbeddingWriter(tmp_path / "src" / "c.parquet", table_schema, 4, (6,))
    source.write(rows)
    source.commit()
    monkeypatch.setattr(parquet.pq, "ParquetWriter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        parquet.EmbeddingWriter(tmp_path / "chunk.parquet", table_schema, 4, (6,))
    with pytest.raises(KeyboardInterrupt):
        parquet.concatenate([str(tmp_path / "src" / "c.parquet")], str(tmp_path / "out.parquet"), table_schema)
    assert files(tmp_path) == ["src"]


def test_a_signal_just_after_the_temporary_file_appeared_leaves_no_file(tmp_path, monkeypatch):
    def open_then_interrupted(path, mode="r", *args, **kwargs):
        with open(path, mode, *args, **kwargs):
            pass
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "open", open_then_interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        storage.AtomicFile(str(tmp_path / "out.parquet"))
    assert files(tmp_path) == []


def test_concatenate_on_a_full_disk_is_one_line_and_keeps_the_earlier_output(tmp_path):
    from esm2cli.errors import OutputError

    table_schema = schema.build_schema(64, (6,), False, {})
    sources = []
    for k in range(2):
        rows = schema.Rows([f"{k}-{i}" for i in range(200)], [""] * 200, [3] * 200, [False] * 200,
                           {6: np.random.default_rng(k).random((200, 64), dtype=np.float32)}, {})  # fmt: skip
        source = parquet.EmbeddingWriter(tmp_path / "src" / f"c{k}.parquet", table_schema, 64, (6,))
        source.write(rows)
        source.commit()
        sources.append(str(tmp_path / "src" / f"c{k}.parquet"))
    out = tmp_path / "out.parquet"
    out.write_bytes(b"an earlier output")
    with file_size_cap(16 << 10), pytest.raises(OutputError) as caught:  # 400 x 64 float32: 100 kB
        parquet.concatenate(sources, str(out), table_schema)
    assert str(caught.value) == f"cannot write {out}: File too large"
    assert files(tmp_path) == ["out.parquet", "src"] and out.read_bytes() == b"an earlier output"
    assert parquet.concatenate(sources, str(out), table_schema, expected_rows=400) == 400  # the control: with room
    assert pq.read_table(out)["id"].to_pylist() == [f"{k}-{i}" for k in range(2) for i in range(200)]
