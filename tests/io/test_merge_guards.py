"""Merging parts refuses what would mix or lose data, and an aborted merge leaves nothing behind: parts of
different shard counts, mixed .h5/.parquet parts, parts of another run, columns that differ, row counts
that do not add up. An existing output is never touched by a merge that fails."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.errors import OutputError, OutputExistsError, PartsError
from esm2cli.io import hdf5
from esm2cli.io.merge import merge_parts
from esm2cli.io.parquet import EmbeddingWriter, concatenate
from esm2cli.io.schema import METADATA_KEY, Rows, build_schema

IDENTITY = {"input_sha256": "ab" * 32, "model_identity": "random:x", "layers": [6], "shard": [0, 2]}


def write_part(path, ids, hidden=4, identity=None):
    n = len(ids)
    identity = {**IDENTITY, **(identity or {})}
    rows = Rows(list(ids), ["d"] * n, [3] * n, [False] * n,
                {6: np.arange(n * hidden, dtype=np.float32).reshape(n, hidden)}, {})  # fmt: skip
    writer = EmbeddingWriter(path, build_schema(hidden, (6,), False, {"layers": [6], "identity": identity}), hidden,
                             (6,))  # fmt: skip
    writer.write(rows)
    writer.commit()
    return path


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def merge_cli(prefix, output, *extra):
    return CliRunner().invoke(cli, ["merge", str(prefix), "-o", str(output), *extra])


def test_parts_of_different_shard_counts_are_refused(tmp_path):
    parts = tmp_path / "emb"
    write_part(parts / "part-00000-of-00002.parquet", ["a"])
    write_part(parts / "part-00001-of-00002.parquet", ["b"])
    write_part(parts / "part-00000-of-00003.parquet", ["a"])
    with pytest.raises(PartsError, match=r"parts of different shard counts \(2, 3\)"):
        merge_parts(str(parts), str(tmp_path / "all.parquet"))
    result = merge_cli(parts, tmp_path / "all.parquet")
    assert result.exit_code == 2 and "different shard counts" in result.output
    assert not (tmp_path / "all.parquet").exists()


def test_mixed_hdf5_and_parquet_parts_are_refused(tmp_path):
    parts = tmp_path / "emb"
    write_part(parts / "part-00000-of-00002.parquet", ["a"])
    write_part(parts / "part-00001-of-00002.parquet", ["b"])
    hdf5.from_parquet([str(parts / "part-00001-of-00002.parquet")], str(parts / "part-00001-of-00002.h5"))
    with pytest.raises(PartsError, match="both Parquet and HDF5 parts; merge one format at a time"):
        merge_parts(str(parts), str(tmp_path / "all.parquet"))
    assert not (tmp_path / "all.parquet").exists()


def test_parts_of_another_run_are_refused_and_named(tmp_path):
    parts = tmp_path / "emb"
    write_part(parts / "part-00000-of-00002.parquet", ["a"])
    write_part(parts / "part-00001-of-00002.parquet", ["b"], identity={"model_identity": "random:y", "shard": [1, 2]})
    with pytest.raises(PartsError, match=r"part-00001-of-00002.parquet was made by another run .*weights changed"):
        merge_parts(str(parts), str(tmp_path / "all.parquet"))
    assert not (tmp_path / "all.parquet").exists()


def test_columns_that_differ_abort_the_merge_and_keep_the_old_output(tmp_path):
    parts = tmp_path / "emb"
    write_part(parts / "part-00000-of-00002.parquet", ["a"], hidden=4)
    write_part(parts / "part-00001-of-00002.parquet", ["b"], hidden=8, identity={"shard": [1, 2]})
    out = tmp_path / "all.parquet"
    out.write_bytes(b"an older output")
    with pytest.raises(OutputError, match="part-00001-of-00002.parquet: its columns differ from those of"):
        merge_parts(str(parts), str(out), overwrite=True)
    assert out.read_bytes() == b"an older output" and leftovers(tmp_path) == []
    result = merge_cli(parts, out, "--overwrite")
    assert result.exit_code == 1 and "columns differ" in result.output and "Traceback" not in result.output
    assert out.read_bytes() == b"an older output" and leftovers(tmp_path) == []
    h5 = tmp_path / "all.h5"  # the same parts toward HDF5: the same refusal, no file
    with pytest.raises(OutputError, match="its columns differ"):
        merge_parts(str(parts), str(h5))
    assert not h5.exists() and leftovers(tmp_path) == []


def test_a_row_count_mismatch_aborts_without_a_file(tmp_path):
    sources = [str(write_part(tmp_path / f"c{i}.parquet", [f"{i}a", f"{i}b"])) for i in range(2)]
    schema = pq.read_schema(sources[0])
    target = tmp_path / "out.parquet"
    with pytest.raises(OutputError, match="2 files hold 4 rows, expected 5; this is a bug"):
        concatenate(sources, str(target), schema, expected_rows=5)
    assert not target.exists() and leftovers(tmp_path) == []
    with pytest.raises(OutputError, match="2 files hold 4 rows, expected 3"):
        hdf5.from_parquet(sources, str(tmp_path / "out.h5"), expected_rows=3)
    assert not (tmp_path / "out.h5").exists() and leftovers(tmp_path) == []
    assert concatenate(sources, str(target), schema, expected_rows=4) == 4  # the control
    assert pq.read_table(target)["id"].to_pylist() == ["0a", "0b", "1a", "1b"]


def test_a_merge_done_is_reported_and_another_output_is_kept(tmp_path):
    parts = tmp_path / "emb"
    write_part(parts / "part-00000-of-00002.parquet", ["a"])
    write_part(parts / "part-00001-of-00002.parquet", ["b", "c"], identity={"shard": [1, 2]})
    out = tmp_path / "all.parquet"
    assert merge_parts(str(parts), str(out)) == 3
    meta = json.loads(pq.read_schema(out).metadata[METADATA_KEY])
    assert meta["parts"] == 2 and meta["identity"]["shard"] == "merged"
    assert merge_parts(str(parts), str(out)) is None  # this very merge is there already
    other = tmp_path / "other.parquet"
    other.write_bytes(b"something else")
    with pytest.raises(OutputExistsError, match="already exists"):
        merge_parts(str(parts), str(other))
    assert other.read_bytes() == b"something else"
    with pytest.raises(OutputExistsError, match="lies inside"):
        merge_parts(str(parts), str(parts / "all.parquet"))
