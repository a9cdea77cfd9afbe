"""Parquet page checksums: written with every page, checked when an earlier file is read again.

A flipped byte in the middle of an output's embedding data still decodes as numbers; the checksum is what
finds it. Reuse sources, resume chunks and merge parts are read with checks: damage is an error or a
"not reused" line, never copied on as numbers.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.io.chunks import ChunkStore
from esm2cli.jobs.workload import synthetic_sequences
from helpers import write_fasta

SEQS = list(synthetic_sequences(24, seed=3, max_length=200))


def embed(*args):
    return CliRunner().invoke(cli, ["embed", *map(str, args), "--dtype", "float32", "--devices", "cpu"])


def flip_middle(path, column: str = "embedding", row_group: int = 0) -> None:
    """Inverts 8 bytes in the middle of one column's data in one row group: the page still decodes."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    (chunk,) = [
        meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.split(".")[0] == column
    ]
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


@pytest.fixture
def output(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", SEQS)
    out = tmp_path / "old.parquet"
    result = embed(fa, "-o", out, "-m", tiny_model_dir)
    assert result.exit_code == 0, result.output
    return fa, out


def test_every_page_of_an_output_carries_a_checksum(output):
    _, out = output
    table = pq.read_table(out)
    flip_middle(out)
    unchecked = pq.read_table(out)  # the reproduction: without checks the damage reads as numbers
    assert unchecked["id"].to_pylist() == table["id"].to_pylist()
    assert not np.array_equal(np.array(unchecked["embedding"].to_pylist()), np.array(table["embedding"].to_pylist()))
    with pytest.raises(OSError, match="(?i)checksum"):
        pq.ParquetFile(out, page_checksum_verification=True).read()


def test_a_damaged_reuse_source_is_an_error_never_copied(tmp_path, output, tiny_model_dir):
    fa, old = output
    flip_middle(old)
    out = tmp_path / "new.parquet"
    result = embed(fa, "-o", out, "-m", tiny_model_dir, "--reuse", old)
    assert result.exit_code == 2, result.output
    damaged = f"--reuse: {old} is damaged (a Parquet page fails its checksum): run again without it, with --overwrite"
    assert damaged in result.output
    assert not out.exists()
    again = embed(fa, "-o", out, "-m", tiny_model_dir, "--overwrite")
    assert again.exit_code == 0, again.output


def test_a_reuse_source_with_damaged_hashes_is_not_reused(tmp_path, output, tiny_model_dir):
    fa, old = output
    fresh = pq.read_table(old)
    flip_middle(old, "sequence_sha256")
    out = tmp_path / "new.parquet"
    result = embed(fa, "-o", out, "-m", tiny_model_dir, "--reuse", old)
    assert result.exit_code == 0, result.output
    assert f"not reused: {old} is damaged (a Parquet page fails its checksum)" in result.output
    assert "reused from" not in result.output
    np.testing.assert_array_equal(np.array(pq.read_table(out)["embedding"].to_pylist()),
                                  np.array(fresh["embedding"].to_pylist()))  # fmt: skip


def test_a_damaged_resume_chunk_is_removed_and_computed_again(tmp_path, output, tiny_model_dir, monkeypatch):
    fa, fresh_path = output
    fresh = pq.read_table(fresh_path)
    out = tmp_path / "out.parquet"
    with monkeypatch.context() as patch:  # the first run stops after its last chunk, before the merge
        patch.setattr(ChunkStore, "commit", lambda self, chunks, rows: None)
        assert embed(fa, "-o", out, "-m", tiny_model_dir, "--chunk-size", 8).exit_code == 0
    chunks = sorted((tmp_path / "_out.parquet.parts").glob("chunk-*.parquet"))
    assert len(chunks) == 3
    flip_middle(chunks[1])
    failed = embed(fa, "-o", out, "-m", tiny_model_dir, "--chunk-size", 8)
    assert failed.exit_code == 1, failed.output
    assert f"{chunks[1]} is damaged (a Parquet page fails its checksum): that chunk was removed" in failed.output
    assert not out.exists() and not chunks[1].exists() and chunks[0].exists()
    redone = embed(fa, "-o", out, "-m", tiny_model_dir, "--chunk-size", 8)
    assert redone.exit_code == 0 and "16 resumed" in redone.output.replace(",", ""), redone.output
    np.testing.assert_allclose(np.array(pq.read_table(out)["embedding"].to_pylist()),
                               np.array(fresh["embedding"].to_pylist()), rtol=0, atol=1e-5)  # fmt: skip


def test_a_damaged_part_is_named_by_merge(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", SEQS)
    parts = tmp_path / "parts"
    for index in range(2):
        result = embed(fa, "-o", parts, "-m", tiny_model_dir, "--shard-index", index, "--shard-count", 2)
        assert result.exit_code == 0, result.output
    damaged = parts / "part-00001-of-00002.parquet"
    flip_middle(damaged)
    result = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "all.parquet")])
    assert result.exit_code == 2, result.output
    assert f"{damaged} is damaged (a Parquet page fails its checksum): rerun that shard" in result.output
    assert not (tmp_path / "all.parquet").exists()


def score_schema():
    import pyarrow as pa

    return pa.schema([pa.field("id", pa.string()), pa.field("score", pa.float64())], metadata={b"esm2cli": b"{}"})


def test_table_writer_buffers_row_groups_and_appears_only_on_commit(tmp_path):
    from esm2cli.io.parquet import TableWriter

    out = tmp_path / "scores.parquet"
    out.write_bytes(b"an earlier output")
    writer = TableWriter(out, score_schema(), row_group_rows=4)
    written = []
    for start in range(0, 9, 3):  # 3 rows a write: every full group of 4 is written at once
        writer.write_columns({"id": [f"r{i}" for i in range(start, start + 3)],
                              "score": [i / 2 for i in range(start, start + 3)]})  # fmt: skip
        written.append(writer.rows_written)
    writer.write_columns({"id": ["r9"], "score": [4.5]})
    assert written == [0, 4, 8] and out.read_bytes() == b"an earlier output"
    writer.commit()
    meta = pq.ParquetFile(out).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 2]
    assert pq.read_table(out)["score"].to_pylist() == [i / 2 for i in range(10)]
    assert "BYTE_STREAM_SPLIT" in meta.row_group(0).column(1).encodings  # io.schema.write_options, as embeddings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]


def test_table_writer_abort_leaves_the_earlier_file(tmp_path):
    from esm2cli.io.parquet import TableWriter

    out = tmp_path / "scores.parquet"
    out.write_bytes(b"an earlier output")
    writer = TableWriter(out, score_schema(), row_group_rows=1)
    writer.write_columns({"id": ["a"], "score": [1.0]})
    writer.abort()
    assert out.read_bytes() == b"an earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]


def test_table_writer_pages_carry_checksums(tmp_path):
    from esm2cli.io.parquet import TableWriter

    out = tmp_path / "scores.parquet"
    writer = TableWriter(out, score_schema())
    writer.write_columns({"id": [f"r{i}" for i in range(4000)], "score": [float(i) for i in range(4000)]})
    writer.commit()
    flip_middle(out, column="score")
    with pytest.raises(OSError, match="CRC"):
        pq.read_table(out, page_checksum_verification=True)


def test_table_writer_on_a_full_disk_is_one_line_and_leaves_no_file(tmp_path):
    import resource

    from esm2cli.errors import OutputError
    from esm2cli.io.parquet import TableWriter

    out = tmp_path / "scores.parquet"
    writer = TableWriter(out, score_schema(), row_group_rows=1 << 30)
    writer.write_columns({"id": [f"r{i}" for i in range(20000)], "score": np.random.default_rng(0).random(20000)})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 10, hard))  # EFBIG past 8 kB, as ENOSPC would be
    try:
        with pytest.raises(OutputError) as caught:
            writer.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(caught.value) == f"cannot write {out}: File too large"
    writer.abort()
    assert list(tmp_path.iterdir()) == []
