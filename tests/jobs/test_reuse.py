"""--reuse: rows of earlier outputs copied by sequence hash, the rest computed; equal to a fresh run."""

from __future__ import annotations

import hashlib
import json
import os
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.api import Embedder
from esm2cli.cli import cli
from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig
from esm2cli.errors import Interrupted
from esm2cli.io.parquet import read_metadata
from esm2cli.jobs.workload import synthetic_sequences
from helpers import build_tiny_esm2, write_fasta


def embed(*args):
    return CliRunner().invoke(cli, ["embed", *map(str, args), "--dtype", "float32", "--devices", "cpu"])


def embed_ok(*args):
    result = embed(*args)
    assert result.exit_code == 0, result.output
    return result


def sha(seq: str) -> str:
    return hashlib.sha256(seq.encode()).hexdigest()


def edit(seq: str) -> str:
    """One residue replaced: same length."""
    return seq[:7] + ("W" if seq[7] != "W" else "A") + seq[8:]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """An old set of 45 proteins and a new one: the old with 5 edited (one residue, same length) plus 5 new."""
    folder = tmp_path_factory.mktemp("releases")
    seqs = list(synthetic_sequences(50, seed=5, max_length=260))
    old = seqs[:45]
    new = [(rid, edit(s) if i % 9 == 0 else s) for i, (rid, s) in enumerate(old)]
    new += seqs[45:]
    return write_fasta(folder / "old.fa", old), write_fasta(folder / "new.fa", new), old, new


@pytest.fixture(scope="module")
def old_parquet(releases, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("old") / "old.parquet"
    embed_ok(releases[0], "-o", out, "-m", tiny_model_dir, "--chunk-size", 16)
    return out


@pytest.fixture(scope="module")
def fresh(releases, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh") / "fresh.parquet"
    embed_ok(releases[1], "-o", out, "-m", tiny_model_dir)
    return pq.read_table(out)


def assert_same_as_fresh(table: pa.Table, fresh: pa.Table, column: str = "embedding") -> None:
    for name in ("id", "description", "length", "truncated", "windows", "sequence_sha256"):
        assert table[name].to_pylist() == fresh[name].to_pylist(), name
    got = np.array(table[column].to_pylist(), np.float32)
    want = np.array(fresh[column].to_pylist(), np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def reorder_column(path, column: str, order: list[int], target=None) -> None:
    """Writes ``path`` (to ``target``, else over it) with one column's values in ``order``, the rest and the
    esm2cli metadata kept: a file edited by other tools after esm2cli wrote it."""
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), table.column(column).take(order))
    pq.write_table(table.replace_schema_metadata(pq.read_schema(path).metadata), target or path)


def rows_by_hash(table: pa.Table, column: str = "embedding") -> dict[str, bytes]:
    vectors = np.array(table[column].to_pylist(), np.float32)
    return {h: v.tobytes() for h, v in zip(table["sequence_sha256"].to_pylist(), vectors, strict=True)}


def test_reuse_equals_a_fresh_run_and_copies_old_rows_bit_for_bit(tmp_path, releases, tiny_model_dir, old_parquet,
                                                                  fresh):  # fmt: skip
    _, new_fa, old, new = releases
    out = tmp_path / "new.parquet"
    result = embed_ok(new_fa, "-o", out, "-m", tiny_model_dir, "--chunk-size", 8, "--reuse", old_parquet)
    table = pq.read_table(out)
    assert_same_as_fresh(table, fresh)
    assert table["sequence_sha256"].to_pylist() == [sha(s) for _, s in new]  # the residues, as sha256sum has them
    unchanged = {sha(s) for _, s in old} & {sha(s) for _, s in new}
    assert len(unchanged) == 40
    before, after = rows_by_hash(pq.read_table(old_parquet)), rows_by_hash(table)
    assert all(after[h] == before[h] for h in unchanged)
    assert f"40 reused from {old_parquet} (40), 10 computed" in result.stderr
    assert read_metadata(out)["identity"] == json.loads(fresh.schema.metadata[b"esm2cli"])["identity"]


@pytest.mark.parametrize(
    "options, differs",
    [(["--pooling", "bos"], "pooling 'bos'"), (["--truncate", "100"], "truncate 100"),
     (["--layers", "1"], "layers [1]"), (["--per-token"], "per_token True")],
)  # fmt: skip
def test_an_output_of_other_options_is_never_reused(tmp_path, releases, tiny_model_dir, fresh, options, differs):
    old_fa, new_fa, _, _ = releases
    other = tmp_path / "other.parquet"
    embed_ok(old_fa, "-o", other, "-m", tiny_model_dir, *options)
    out = tmp_path / "new.parquet"
    result = embed_ok(new_fa, "-o", out, "-m", tiny_model_dir, "--reuse", other)
    assert f"not reused: {other} was made with {differs}" in result.stderr
    assert "reused from" not in result.stderr and "embedded 50 sequences" in result.stderr
    assert_same_as_fresh(pq.read_table(out), fresh)


def test_an_output_of_other_weights_or_without_hashes_is_not_reused(tmp_path, releases, tiny_model_dir, old_parquet,
                                                                     fresh):  # fmt: skip
    old_fa, new_fa, _, _ = releases
    other_model = build_tiny_esm2(tmp_path / "other-model", seed=9)
    other = tmp_path / "other.parquet"
    embed_ok(old_fa, "-o", other, "-m", other_model)
    table = pq.read_table(old_parquet)
    unhashed = tmp_path / "unhashed.parquet"  # as esm2cli wrote outputs before the column existed
    pq.write_table(table.drop_columns(["sequence_sha256"]).replace_schema_metadata(table.schema.metadata), unhashed)
    out = tmp_path / "new.parquet"
    result = embed_ok(new_fa, "-o", out, "-m", tiny_model_dir, "--reuse", other, "--reuse", unhashed)
    assert f"not reused: {other} was made with other weights" in result.stderr
    assert f"not reused: {unhashed} has no sequence_sha256 column" in result.stderr
    assert "reused from" not in result.stderr
    assert_same_as_fresh(pq.read_table(out), fresh)


def test_a_missing_reuse_path_is_a_usage_error(tmp_path, releases, tiny_model_dir):
    result = embed(releases[1], "-o", tmp_path / "x.parquet", "-m", tiny_model_dir, "--reuse", tmp_path / "nope")
    assert result.exit_code == 2 and "--reuse" in result.output and "nope" in result.output
    assert not (tmp_path / "x.parquet").exists()


def test_windows_and_per_token_rows_are_reused(tmp_path, releases, tiny_model_dir):
    old_fa, new_fa, _, new = releases
    options = ["-m", tiny_model_dir, "--truncate", "60", "--long-sequences", "window", "--window-overlap", "20",
               "--per-token"]  # fmt: skip
    old, fresh, out = tmp_path / "old.parquet", tmp_path / "fresh.parquet", tmp_path / "new.parquet"
    embed_ok(old_fa, "-o", old, *options)
    embed_ok(new_fa, "-o", fresh, *options)
    result = embed_ok(new_fa, "-o", out, *options, "--reuse", old)
    assert "40 reused from" in result.stderr
    table, want = pq.read_table(out), pq.read_table(fresh)
    assert max(table["windows"].to_pylist()) > 1
    assert table["sequence_sha256"].to_pylist() == [sha(s) for _, s in new]  # the whole protein, windows and all
    assert_same_as_fresh(table, want)
    for got, expected in zip(table["per_token"].to_pylist(), want["per_token"].to_pylist(), strict=True):
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=0, atol=1e-5)


def test_shards_reuse_a_sharded_output_and_merge(tmp_path, releases, tiny_model_dir, fresh):
    old_fa, new_fa, _, _ = releases
    old_parts, new_parts = tmp_path / "old-parts", tmp_path / "new-parts"
    for i in range(3):
        embed_ok(old_fa, "-o", old_parts, "-m", tiny_model_dir, "--shard-count", 3, "--shard-index", i)
    for i in range(2):
        result = embed_ok(new_fa, "-o", new_parts, "-m", tiny_model_dir, "--shard-count", 2, "--shard-index", i,
                          "--reuse", old_parts)  # fmt: skip
        assert "reused from" in result.stderr and "part-0000" in result.stderr
    merged = tmp_path / "merged.parquet"
    assert CliRunner().invoke(cli, ["merge", str(new_parts), "-o", str(merged)]).exit_code == 0
    assert_same_as_fresh(pq.read_table(merged), fresh)


def test_hdf5_outputs_are_reused_and_written(tmp_path, releases, tiny_model_dir, fresh):
    h5py = pytest.importorskip("h5py")
    old_fa, new_fa, _, new = releases
    old_h5, out_h5 = tmp_path / "old.h5", tmp_path / "new.h5"
    embed_ok(old_fa, "-o", old_h5, "-m", tiny_model_dir)
    result = embed_ok(new_fa, "-o", out_h5, "-m", tiny_model_dir, "--reuse", old_h5)
    assert f"40 reused from {old_h5} (40), 10 computed" in result.stderr
    with h5py.File(out_h5) as f:
        keys = [k for k in f]
        assert [f[k].attrs["sequence_sha256"] for k in keys] == [sha(s) for _, s in new]
        got = np.stack([f[k][()] for k in keys])
    np.testing.assert_allclose(got, np.array(fresh["embedding"].to_pylist()), rtol=0, atol=1e-5)


def _interrupt_after(computed: int):
    """A progress factory that raises Interrupted (as the SIGINT handler does) once ``computed`` rows are computed."""

    def factory(total, residues=None):
        seen = [0]

        def update(rows, residues):
            seen[0] += rows if residues else 0  # reused rows come back without residues
            if seen[0] >= computed:
                raise Interrupted(signal.SIGINT)

        return update

    return factory


def _embed_fasta(fa, out, model_dir, **kw):
    from esm2cli.jobs.pipeline import embed_fasta

    return embed_fasta(
        str(fa), str(out), model=ModelConfig(model=str(model_dir), dtype="float32", devices="cpu"),
        embed=EmbedConfig(), batch=BatchConfig(chunk_size=8), inputs=InputConfig(), **kw,
    )  # fmt: skip


def test_an_interrupted_reuse_run_resumes(tmp_path, releases, tiny_model_dir, old_parquet, fresh):
    out = tmp_path / "new.parquet"
    with pytest.raises(Interrupted):
        _embed_fasta(releases[1], out, tiny_model_dir, reuse=[str(old_parquet)], progress_factory=_interrupt_after(3))
    assert len(list((tmp_path / "_new.parquet.parts").glob("chunk-*.parquet"))) >= 2
    summary = _embed_fasta(releases[1], out, tiny_model_dir, reuse=[str(old_parquet)])
    assert summary.resumed >= 16 and summary.resumed + summary.reused + summary.sequences == 50
    assert_same_as_fresh(pq.read_table(out), fresh)


def test_a_reused_file_that_changed_under_a_resumed_run_is_refused(tmp_path, releases, tiny_model_dir, old_parquet,
                                                                    fresh):  # fmt: skip
    old = tmp_path / "old.parquet"
    old.write_bytes(old_parquet.read_bytes())
    out = tmp_path / "new.parquet"
    with pytest.raises(Interrupted):
        _embed_fasta(releases[1], out, tiny_model_dir, reuse=[str(old)], progress_factory=_interrupt_after(3))
    table = pq.read_table(old)  # rewritten: same rows, another file
    pq.write_table(table.slice(0, 30), old)
    os.utime(old, ns=(1, 1))
    result = embed(releases[1], "-o", out, "-m", tiny_model_dir, "--chunk-size", 8, "--reuse", old)
    assert result.exit_code == 2 and "the files given to --reuse changed" in result.output
    result = embed_ok(releases[1], "-o", out, "-m", tiny_model_dir, "--reuse", old, "--overwrite")
    assert "26 reused from" in result.stderr  # 30 rows, 4 of them edited since
    assert_same_as_fresh(pq.read_table(out), fresh)


def test_the_python_api_reuses(tmp_path, releases, tiny_model_dir, old_parquet, fresh):
    out = tmp_path / "api.parquet"
    with Embedder(tiny_model_dir, devices="cpu", dtype="float32", reuse=[old_parquet]) as embedder:
        summary = embedder.embed_fasta(releases[1], out)
        table = embedder.embed_fasta(releases[1])
    assert summary.reused == 40 and summary.sequences == 10
    assert_same_as_fresh(pq.read_table(out), fresh)
    assert_same_as_fresh(table, fresh)


@pytest.mark.parametrize("factor", [2, 0.5])
def test_a_file_of_other_width_is_not_reused_even_with_the_same_identity(tmp_path, releases, tiny_model_dir,
                                                                         old_parquet, fresh, factor):  # fmt: skip
    _, new_fa, _, _ = releases
    table = pq.read_table(old_parquet)
    vectors = np.array(table["embedding"].to_pylist(), np.float32)
    width = int(vectors.shape[1] * factor)
    other = np.concatenate([vectors, -vectors], axis=1) if factor > 1 else vectors[:, :width]
    column = pa.FixedSizeListArray.from_arrays(pa.array(other.reshape(-1)), width)
    wide = tmp_path / "wide.parquet"  # as a file named by a path, not its architecture, could hold
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", column), wide)
    assert read_metadata(wide)["identity"] == read_metadata(old_parquet)["identity"]
    out = tmp_path / "new.parquet"
    result = embed_ok(new_fa, "-o", out, "-m", tiny_model_dir, "--reuse", wide)
    assert f"not reused: {wide} holds vectors {width} wide (this run: {vectors.shape[1]})" in result.stderr
    assert "reused from" not in result.stderr
    assert_same_as_fresh(pq.read_table(out), fresh)


def test_reuse_of_file_whose_hash_column_is_out_of_step_gives_fresh_vectors(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "GGSSLLKKVVAA")])
    old, new, fresh = tmp_path / "old.parquet", tmp_path / "new.parquet", tmp_path / "fresh.parquet"
    embed_ok(fasta, "-o", old, "-m", tiny_model_dir)
    reorder_column(old, "sequence_sha256", [1, 0])
    result = embed_ok(fasta, "-o", new, "-m", tiny_model_dir, "--reuse", old)
    embed_ok(fasta, "-o", fresh, "-m", tiny_model_dir)
    assert f"not reused: {old}: its row of p1 is" in result.stderr and "out of step" in result.stderr
    assert "reused from" not in result.stderr
    got = np.asarray(pq.read_table(new).column("embedding").to_pylist())
    want = np.asarray(pq.read_table(fresh).column("embedding").to_pylist())
    np.testing.assert_array_equal(got, want)  # computed afresh, as a run without --reuse


def test_only_the_file_out_of_step_is_not_reused(tmp_path, tiny_model_dir):
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    embed_ok(write_fasta(tmp_path / "g.fa", [("p1", "MKTAYIAKQRQ"), ("p2", "GGSSLLKKVVAA")]), "-o", good, "-m",
             tiny_model_dir)  # fmt: skip
    embed_ok(write_fasta(tmp_path / "b.fa", [("p3", "MSTNPKPQRKTKRNTNRRPQDV"), ("p4", "WWHHCC")]), "-o", bad, "-m",
             tiny_model_dir)  # fmt: skip
    reorder_column(bad, "embedding", [1, 0])  # the vectors swapped
    both = write_fasta(tmp_path / "all.fa", [("p1", "MKTAYIAKQRQ"), ("p2", "GGSSLLKKVVAA"),
                                             ("p3", "MSTNPKPQRKTKRNTNRRPQDV"), ("p4", "WWHHCC")])  # fmt: skip
    new, fresh = tmp_path / "new.parquet", tmp_path / "fresh.parquet"
    result = embed_ok(both, "-o", new, "-m", tiny_model_dir, "--reuse", good, "--reuse", bad)
    assert f"not reused: {bad}: its row of p3 is" in result.stderr
    assert f"2 reused from {good} (2), 2 computed" in result.stderr
    embed_ok(both, "-o", fresh, "-m", tiny_model_dir)
    assert_same_as_fresh(pq.read_table(new), pq.read_table(fresh))


def test_a_file_not_yet_checked_is_work_when_chunks_are_sized(tmp_path, releases, tiny_model_dir, old_parquet):
    # 45 rows of 9,674 residues, all in a file that fails its check: counted as free, they made one chunk of
    # every record, all computed at once, past the bound on a chunk's work (an interrupt lost all of it)
    bad = tmp_path / "bad.parquet"
    reorder_column(old_parquet, "embedding", list(range(45))[::-1], bad)
    with Embedder(tiny_model_dir, devices="cpu", dtype="float32", reuse=[bad]) as embedder:
        summary = embedder.embed_fasta(releases[0], tmp_path / "new.parquet")
    assert summary.reused == 0 and summary.sequences == 45
    assert len(summary.chunks) >= 2  # the first closed at FIRST_CHUNK_RESIDUES (4,096) of work
    assert_same_as_fresh(pq.read_table(tmp_path / "new.parquet"), pq.read_table(old_parquet))


def test_reuse_of_damaged_hdf5_vectors_is_refused(tmp_path, tiny_model_dir):
    import h5py

    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "GGSSLLKKVVAA")])
    old, new = tmp_path / "old.h5", tmp_path / "new.parquet"
    base = ["-m", tiny_model_dir, "--devices", "cpu", "--dtype", "float32"]
    assert CliRunner().invoke(cli, ["embed", fasta, "-o", str(old), *base]).exit_code == 0
    with h5py.File(old) as handle:
        dataset = handle["p1"].id  # the first vector's bytes: one chunk (checksummed), or contiguous
        offset = dataset.get_offset() if dataset.get_offset() is not None else dataset.get_chunk_info(0).byte_offset
    raw = bytearray(old.read_bytes())
    raw[offset + 8 : offset + 16] = bytes(b ^ 0x5A for b in raw[offset + 8 : offset + 16])
    old.write_bytes(bytes(raw))
    result = CliRunner().invoke(cli, ["embed", fasta, "-o", str(new), *base, "--reuse", str(old)])
    assert result.exit_code == 2, result.output  # docs/output-format.md: stops with one line naming the file
    assert f"--reuse: {old} is damaged (a dataset fails its checksum" in result.output
    assert not new.exists()


def test_a_file_out_of_step_whose_first_copied_row_is_windowed_gives_no_row(tmp_path, tiny_model_dir):
    # the long protein comes first, in a chunk of its own: its row is the first the file gives
    fasta = write_fasta(tmp_path / "a.fa", [("long", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" * 8),
                                            ("p2", "GGSSLLKKVVAA"), ("p3", "MKTAYIAKQRQISF")])  # fmt: skip
    window = ["--long-sequences", "window", "--truncate", 100, "--window-overlap", 20, "--chunk-size", 1]
    old, new, fresh = tmp_path / "old.parquet", tmp_path / "new.parquet", tmp_path / "fresh.parquet"
    embed_ok(fasta, "-o", old, "-m", tiny_model_dir, *window)
    reorder_column(old, "embedding", [1, 0, 2])  # the long protein's vector and the next one's swapped
    result = embed_ok(fasta, "-o", new, "-m", tiny_model_dir, *window, "--reuse", old)
    embed_ok(fasta, "-o", fresh, "-m", tiny_model_dir, *window)
    assert f"not reused: {old}: its row of long is" in result.stderr
    assert "reused from" not in result.stderr
    assert_same_as_fresh(pq.read_table(new), pq.read_table(fresh))
