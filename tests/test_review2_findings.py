"""Adversarial review 2 of --reuse, score reruns and the serve cache: defects found, as strict xfails.

Every other attack tried (other weights, weights edited in place including only the contact head,
--layers, --pooling, --dtype, --truncate, --long-sequences/--window-overlap, --per-token, --contacts,
HDF5 and pandas-rewritten old files, mixed directories and shard prefixes, --reuse on the output itself,
truncated prefixes; score reruns after edits to the mutant CSV, window, method, dtype, weights, ids,
record order; serve cache with truncation and case) gave a correct answer and is not listed here.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from helpers import write_fasta


def embed_ok(*args):
    result = CliRunner().invoke(cli, ["embed", *map(str, args), "--dtype", "float32", "--devices", "cpu"])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.xfail(
    strict=True,
    reason="--reuse trusts an old file's sequence_sha256 column: with its values out of step with the "
    "vectors (rows swapped by an edit that kept the esm2cli metadata), the wrong vectors are copied and the "
    "summary calls them reused; nothing checks a copied row against its sequence",
)
def test_reuse_of_file_whose_hash_column_is_out_of_step_gives_fresh_vectors(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "GGSSLLKKVVAA")])
    old, new, fresh = tmp_path / "old.parquet", tmp_path / "new.parquet", tmp_path / "fresh.parquet"
    embed_ok(fasta, "-o", old, "-m", tiny_model_dir)
    table = pq.read_table(old)
    column = table.schema.get_field_index("sequence_sha256")
    swapped = pa.array(table.column("sequence_sha256").to_pylist()[::-1], pa.string())
    table = table.set_column(column, table.schema.field(column), swapped)
    pq.write_table(table.replace_schema_metadata(pq.read_schema(old).metadata), old)
    embed_ok(fasta, "-o", new, "-m", tiny_model_dir, "--reuse", old)
    embed_ok(fasta, "-o", fresh, "-m", tiny_model_dir)
    got = np.asarray(pq.read_table(new).column("embedding").to_pylist())
    want = np.asarray(pq.read_table(fresh).column("embedding").to_pylist())
    np.testing.assert_allclose(got, want, atol=1e-5)
