"""esm2cli fetch: a plain model directory that embeds exactly as its source does."""

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner

from conftest import write_fasta
from esm2cli.cli import cli


def _embed(fasta: str, out, model: str) -> np.ndarray:
    result = CliRunner().invoke(cli, ["embed", fasta, "-o", str(out), "-m", model, "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return np.array(pq.read_table(out)["embedding"].to_pylist())


def test_fetched_copy_embeds_as_its_source_and_is_not_overwritten(tiny_model_dir, tmp_path, proteins):
    copy = tmp_path / "models" / "tiny"
    (tmp_path / "models").mkdir()
    result = CliRunner().invoke(cli, ["fetch", "-m", tiny_model_dir, "-o", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "config.json").exists() and (copy / "vocab.txt").exists()
    assert not (tmp_path / "models" / "tiny.partial").exists()
    fasta = write_fasta(tmp_path / "in.fa", proteins[:6])
    assert np.array_equal(
        _embed(fasta, tmp_path / "a.parquet", tiny_model_dir), _embed(fasta, tmp_path / "b.parquet", str(copy))
    )
    again = CliRunner().invoke(cli, ["fetch", "-m", tiny_model_dir, "-o", str(copy)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_fetch_of_a_missing_model_exits_1(tmp_path):
    result = CliRunner().invoke(cli, ["fetch", "-m", str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no such model directory" in result.output
    assert not (tmp_path / "out").exists()
