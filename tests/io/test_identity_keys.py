"""What the run identity holds outside the options' own mode, and how an identity written before a key existed
reads: --window-overlap counts only in window mode; an output written before --output-dtype existed is the
float32 run's (already complete, reused, merged)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.io.schema import METADATA_KEY
from helpers import embed_cli, write_fasta

RECORDS = [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "GGSSLLKKVVAA"), ("p3", "MKVLW")]


def test_another_window_overlap_outside_window_mode_is_already_complete(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    out = tmp_path / "out.parquet"
    embed_cli(fasta, out, tiny_model_dir, "--truncate", 10, "--window-overlap", 2, check=True)
    again = embed_cli(fasta, out, tiny_model_dir, "--truncate", 10, "--window-overlap", 5)
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    assert pq.read_table(out)["truncated"].to_pylist() == [True, True, False]  # the truncate-mode run, kept


def test_another_window_overlap_in_window_mode_is_another_run(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    out = tmp_path / "out.parquet"
    windowed = ["--truncate", 10, "--long-sequences", "window"]
    embed_cli(fasta, out, tiny_model_dir, *windowed, "--window-overlap", 2, check=True)
    again = embed_cli(fasta, out, tiny_model_dir, *windowed, "--window-overlap", 5)
    assert again.exit_code == 2 and "window_overlap was 2, now 5" in again.output, again.output


def _as_written_before_output_dtype(path) -> None:
    """Rewrites an esm2cli Parquet file's metadata as versions before --output-dtype wrote it (no such key)."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta.pop("output_dtype") == "float32" and meta["identity"].pop("output_dtype") == "float32"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), path)


def test_an_output_written_before_output_dtype_is_the_float32_run(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    old = tmp_path / "old.parquet"
    embed_cli(fasta, old, tiny_model_dir, check=True)
    _as_written_before_output_dtype(old)
    again = embed_cli(fasta, old, tiny_model_dir, "--output-dtype", "float32")
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    half = embed_cli(fasta, old, tiny_model_dir, "--output-dtype", "float16")
    assert half.exit_code == 2 and "output_dtype was 'float32', now 'float16'" in half.output, half.output


def test_an_output_written_before_output_dtype_is_reused_by_a_float32_run(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    old, new = tmp_path / "old.parquet", tmp_path / "new.parquet"
    embed_cli(fasta, old, tiny_model_dir, check=True)
    _as_written_before_output_dtype(old)
    result = embed_cli(fasta, new, tiny_model_dir, "--reuse", old, check=True)
    assert f"{len(RECORDS)} reused from" in result.output, result.output
    assert pq.read_table(new)["embedding"].equals(pq.read_table(old)["embedding"])


def test_a_part_written_before_output_dtype_merges_with_a_float32_part(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    parts = tmp_path / "parts"
    for index in range(2):
        embed_cli(fasta, parts, tiny_model_dir, "--shard-count", 2, "--shard-index", index, check=True)
    _as_written_before_output_dtype(parts / "part-00001-of-00002.parquet")
    merged = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "all.parquet")])
    assert merged.exit_code == 0, merged.output
    assert pq.read_table(tmp_path / "all.parquet")["id"].to_pylist() == [rec_id for rec_id, _ in RECORDS]
