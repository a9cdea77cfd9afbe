"""Shared options: the Slurm job-array shard, and --output-dtype's choices."""

from __future__ import annotations

import click
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.cli.options import slurm_shard
from helpers import write_fasta


def test_a_slurm_array_task_is_its_id_less_the_minimum():
    one_based = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert slurm_shard(one_based)[:2] == (2, 4)
    zero_based = {**one_based, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3"}
    assert slurm_shard(zero_based)[:2] == (2, 4)
    assert "SLURM_ARRAY_TASK_MIN=1" in slurm_shard(one_based)[2]
    assert slurm_shard({"SLURM_JOB_ID": "7"}) is None  # a job, not an array


@pytest.mark.parametrize(
    "extra",
    [{"SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_MAX": "7"}, {"SLURM_ARRAY_TASK_MAX": "9"}],
    ids=["stepped", "sparse"],
)
def test_a_stepped_or_sparse_array_is_refused(extra):
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4", **extra}
    with pytest.raises(click.UsageError, match="stepped or sparse"):
        slurm_shard(env)


def _embed(fasta, out, model, *extra, env=None):
    args = ["embed", str(fasta), "-o", str(out), "-m", model, "--dtype", "float32", "--devices", "cpu", *extra]
    return CliRunner().invoke(cli, args, env=env)


def test_a_task_of_a_one_based_slurm_array_writes_the_part_of_the_matching_shard_index(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", [(f"r{i}", "MKTAYIAKQR"[: 2 + i % 9]) for i in range(12)])
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    slurm = _embed(fasta, tmp_path / "slurm", tiny_model_dir, "-v", env=env)
    assert slurm.exit_code == 0, slurm.output
    assert "SLURM_ARRAY_TASK_ID=2, SLURM_ARRAY_TASK_MIN=1, SLURM_ARRAY_TASK_COUNT=3" in slurm.output
    flags = _embed(fasta, tmp_path / "flags", tiny_model_dir, "--shard-count", "3", "--shard-index", "1")
    assert flags.exit_code == 0, flags.output
    got = pq.read_table(tmp_path / "slurm" / "part-00001-of-00003.parquet")
    want = pq.read_table(tmp_path / "flags" / "part-00001-of-00003.parquet")
    assert got.num_rows > 0 and got.drop_columns([]).equals(want)


def test_a_sparse_slurm_array_is_one_line_and_exit_2(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", [("a", "MKV")])
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3",
           "SLURM_ARRAY_TASK_MAX": "9"}  # fmt: skip
    result = _embed(fasta, tmp_path / "out", tiny_model_dir, env=env)
    assert result.exit_code == 2 and "stepped or sparse" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_slurm_task_id_below_min_is_one_line(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK"), ("p2", "GGSS")])
    env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    result = CliRunner().invoke(
        cli, ["embed", fasta, "-o", str(tmp_path / "out"), "-m", tiny_model_dir, "--devices", "cpu"], env=env
    )
    assert result.exit_code == 2, result.output
    assert "SLURM_ARRAY_TASK_ID" in result.output


def test_shard_index_without_count_is_refused(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK"), ("p2", "GGSS")])
    result = CliRunner().invoke(
        cli,
        ["embed", fasta, "-o", str(tmp_path / "o.parquet"), "-m", tiny_model_dir, "--devices", "cpu",
         "--shard-index", "3"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--shard-count" in result.output


def test_slurm_array_task_with_a_file_output_is_not_silently_sharded(tmp_path, tiny_model_dir):
    records = [(f"p{i}", "MKTAYIAKQRQISFVKSHFSRQ"[: 6 + i]) for i in range(10)]
    fasta = write_fasta(tmp_path / "in_3.fa", records)
    out = tmp_path / "out_3.parquet"
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "10"}
    result = CliRunner().invoke(
        cli, ["embed", fasta, "-o", str(out), "-m", tiny_model_dir, "--devices", "cpu"], env=env
    )
    assert result.exit_code == 0, result.output  # docs/deployment.md: a file output is not sharded
    assert "names a file: the Slurm array variables are ignored" in result.output
    assert pq.read_table(out)["id"].to_pylist() == [rec_id for rec_id, _ in records]
