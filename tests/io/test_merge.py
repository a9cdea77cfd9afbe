"""merge of byte-range parts: the parts must have read one version of one input; ids repeated across shards are
named; a gzip input that cannot be split is read whole by each shard after one warning."""

from __future__ import annotations

import gzip
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from helpers import byte_shard_sizes, embed_cli, write_fasta


def _shard(fasta, out, model, index, count, *extra):
    result = embed_cli(fasta, out, model, "--shard-count", count, "--shard-index", index, *extra)
    assert result.exit_code == 0, result.output
    return result


def _merge(prefix, output):
    return CliRunner().invoke(cli, ["merge", str(prefix), "-o", str(output)])


RECORDS = [(f"r{i}", "MKTAYIAKQRQISFVKSHFSRQ"[: 3 + i % 17]) for i in range(16)]


def test_a_file_that_changed_between_shards_is_refused_with_the_shard_and_both_stamps(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    _shard(fasta, tmp_path / "emb", tiny_model_dir, 0, 2)
    before = os.stat(fasta).st_mtime_ns
    os.utime(fasta, ns=(before + 10**9, before + 10**9))  # touched (a re-download of the same name, say)
    _shard(fasta, tmp_path / "emb", tiny_model_dir, 1, 2)
    result = _merge(tmp_path / "emb", tmp_path / "all.parquet")
    assert result.exit_code == 2, result.output
    assert "shard 1 read the input at size" in result.output and "the input changed between shards" in result.output
    assert str(before) in result.output and str(before + 10**9) in result.output
    assert not (tmp_path / "all.parquet").exists()


def test_a_finished_shard_is_complete_until_its_file_changes(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    _shard(fasta, tmp_path / "emb", tiny_model_dir, 1, 3)
    again = embed_cli(fasta, tmp_path / "emb", tiny_model_dir, "--shard-count", 3, "--shard-index", 1)
    assert again.exit_code == 0 and "already complete" in again.output
    stamp = os.stat(fasta).st_mtime_ns + 10**9
    os.utime(fasta, ns=(stamp, stamp))
    changed = embed_cli(fasta, tmp_path / "emb", tiny_model_dir, "--shard-count", 3, "--shard-index", 1)
    assert changed.exit_code == 2 and "input_slice" in changed.output  # another run's part: named, kept
    assert pq.read_table(tmp_path / "emb" / "part-00001-of-00003.parquet").num_rows > 0


def test_ids_repeated_across_shards_are_named_by_merge(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", [*RECORDS, ("r0", "MKV"), ("r3", "WW")])
    for index in range(3):
        _shard(fasta, tmp_path / "emb", tiny_model_dir, index, 3)  # each shard sees its ids once
    result = _merge(tmp_path / "emb", tmp_path / "all.parquet")
    assert result.exit_code == 2, result.output
    assert "2 id(s) occur in more than one shard: 'r0' in shards 0, 2; 'r3' in shards 0, 2" in result.output
    assert not (tmp_path / "all.parquet").exists()
    allowed = tmp_path / "allowed"
    for index in range(3):
        _shard(fasta, allowed, tiny_model_dir, index, 3, "--allow-duplicate-ids")
    assert _merge(allowed, tmp_path / "all.parquet").exit_code == 0
    assert pq.read_table(tmp_path / "all.parquet").num_rows == len(RECORDS) + 2


def test_ids_repeated_inside_a_shard_are_reported_by_that_shard(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", [("a", "MKV"), ("a", "MKW"), *RECORDS])
    result = embed_cli(fasta, tmp_path / "emb", tiny_model_dir, "--shard-count", 4, "--shard-index", 0)
    assert result.exit_code == 2 and "duplicate id 'a' (2 records)" in result.output


def test_merge_writes_input_order_from_parts_of_uneven_sizes_and_empty_ones(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", [("long", "M" * 900), *RECORDS[:3]])
    count = 9
    for index in range(count):
        _shard(fasta, tmp_path / "emb", tiny_model_dir, index, count)
    sizes = [pq.read_table(tmp_path / "emb" / f"part-{i:05d}-of-{count:05d}.parquet").num_rows for i in range(count)]
    assert sizes == byte_shard_sizes(fasta, count) and 0 in sizes  # empty parts are valid, empty files
    assert _merge(tmp_path / "emb", tmp_path / "all.parquet").exit_code == 0
    assert pq.read_table(tmp_path / "all.parquet")["id"].to_pylist() == ["long", "r0", "r1", "r2"]


def test_plain_gzip_with_shards_warns_once_with_the_cost_and_the_remedy_then_runs(tmp_path, tiny_model_dir):
    text = "".join(f">{rec_id}\n{seq}\n" for rec_id, seq in RECORDS)
    (tmp_path / "in.fa.gz").write_bytes(gzip.compress(text.encode()))
    parts = []
    for index in range(2):
        result = _shard(tmp_path / "in.fa.gz", tmp_path / "emb", tiny_model_dir, index, 2)
        assert result.output.count("plain gzip, which cannot be split") == 1 and "bgzip" in result.output
        parts.append(pq.read_table(tmp_path / "emb" / f"part-{index:05d}-of-00002.parquet"))
    assert [rec_id for part in parts for rec_id in part["id"].to_pylist()] == [rec_id for rec_id, _ in RECORDS]
    assert _merge(tmp_path / "emb", tmp_path / "all.parquet").exit_code == 0


def test_merge_into_hdf5_refuses_a_damaged_part(tmp_path, tiny_model_dir):
    import pyarrow.parquet as pq

    records = [(f"p{i}", "MKTAYIAKQRQISFVKSHFSRQGGSSLLKKVVAA"[: 8 + 2 * i]) for i in range(8)]
    fasta = write_fasta(tmp_path / "a.fa", records)
    parts = tmp_path / "parts"
    for index in range(2):
        _shard(fasta, parts, tiny_model_dir, index, 2)
    part = parts / "part-00001-of-00002.parquet"
    column = pq.ParquetFile(part).metadata.row_group(0).column(pq.read_schema(part).get_field_index("embedding"))
    at = column.data_page_offset + column.total_compressed_size - 40  # inside the vectors' values
    raw = bytearray(part.read_bytes())
    raw[at : at + 8] = bytes(b ^ 0x5A for b in raw[at : at + 8])
    part.write_bytes(bytes(raw))
    refused = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "all.parquet")])
    assert refused.exit_code == 2 and "damaged" in refused.output  # the Parquet merge sees it
    result = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "all.h5")])
    assert result.exit_code == 2 and "damaged" in result.output, result.output


def test_merge_of_a_renamed_part_blames_the_file_not_esm2cli(tmp_path, tiny_model_dir):
    import shutil

    fasta = write_fasta(tmp_path / "a.fa", [(f"p{i}", "MKTAYIAKQRQISFVKSHFSRQ"[: 6 + i]) for i in range(6)])
    parts = tmp_path / "parts"
    for index in (0, 1):
        _shard(fasta, parts, tiny_model_dir, index, 2)
    shutil.copy(parts / "part-00000-of-00002.parquet", parts / "part-00001-of-00002.parquet")
    result = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "all.parquet")])
    assert result.exit_code == 2
    assert "bug" not in result.output, result.output


def test_parts_of_a_six_digit_shard_count_are_found_by_merge(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK"), ("p2", "GGSS")])
    parts = tmp_path / "parts"
    result = CliRunner().invoke(
        cli,
        ["embed", fasta, "-o", str(parts), "-m", tiny_model_dir, "--devices", "cpu", "--shard-count", "100000",
         "--shard-index", "99999"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (parts / "part-99999-of-100000.parquet").is_file()  # as many digits as the count needs (docs/embed.md)
    merged = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "all.parquet")])
    assert merged.exit_code == 2 and "99999 of 100000 shards are not finished: 0, 1, 2" in merged.output


def test_merge_into_hdf5_names_ids_repeated_across_shards(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "GGSSLLKKVVAA"),
                                            ("p1", "MKVLLLAAAGGSSLLKKVVAA"), ("p4", "MKV")])  # fmt: skip
    parts = tmp_path / "parts"
    for index in range(2):
        result = CliRunner().invoke(
            cli,
            ["embed", fasta, "-o", str(parts), "-m", tiny_model_dir, "--devices", "cpu", "--shard-count", "2",
             "--shard-index", str(index)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    parquet = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "all.parquet")])
    assert parquet.exit_code == 2 and "shards 0, 1" in parquet.output
    hdf5 = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "all.h5")])
    assert hdf5.exit_code == 2 and "shards 0, 1" in hdf5.output, hdf5.output


def test_merge_onto_another_output_names_what_differs_and_a_rerun_is_complete(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS[:6])
    for index in range(2):
        _shard(fasta, tmp_path / "emb", tiny_model_dir, index, 2)
    out = tmp_path / "all.parquet"
    assert _merge(tmp_path / "emb", out).exit_code == 0
    again = _merge(tmp_path / "emb", out)
    assert again.exit_code == 0 and pq.read_table(out).num_rows == 6
    other = tmp_path / "other.parquet"
    embed_cli(fasta, other, tiny_model_dir, "--pooling", "bos", check=True)  # another run's output
    refused = _merge(tmp_path / "emb", other)
    assert refused.exit_code == 2 and "already exists, made by another run (" in refused.output, refused.output
    assert "pooling" in refused.output
    foreign = tmp_path / "notes.parquet"
    foreign.write_bytes(b"not esm2cli output")
    refused = _merge(tmp_path / "emb", foreign)
    assert refused.exit_code == 2 and "already exists and is not esm2cli output" in refused.output, refused.output
    assert foreign.read_bytes() == b"not esm2cli output"


def test_merge_into_a_fifo_is_refused_not_waited_on(tmp_path, tiny_model_dir):
    from esm2cli.errors import ConfigError
    from esm2cli.io.merge import merge_parts
    from helpers import within

    fasta = write_fasta(tmp_path / "in.fa", [("a", "MKV"), ("b", "MKVL")])
    for index in range(2):
        _shard(fasta, tmp_path / "parts", tiny_model_dir, index, 2)
    fifo = tmp_path / "merged.fifo"
    os.mkfifo(fifo)

    def merge():
        with pytest.raises(ConfigError, match="is not a regular file"):
            merge_parts(str(tmp_path / "parts"), str(fifo))
        return True

    assert within(30, merge)  # it waited for a writer of the FIFO for ever


def test_merge_into_a_link_writes_the_file_it_names(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    _shard(fasta, tmp_path / "emb", tiny_model_dir, 0, 2)
    _shard(fasta, tmp_path / "emb", tiny_model_dir, 1, 2)
    real, link = tmp_path / "data" / "all.parquet", tmp_path / "all.parquet"
    real.parent.mkdir()
    os.symlink(os.path.join("data", "all.parquet"), link)  # relative, as `ln -s data/all.parquet` makes it
    result = _merge(tmp_path / "emb", link)
    assert result.exit_code == 0, result.output
    # before: the commit's rename replaced the link with the merged file and data/all.parquet was never written
    assert os.path.islink(link)
    assert pq.read_table(real).column("id").to_pylist() == [r for r, _ in RECORDS]


@pytest.mark.parametrize("allowed", [0, 1], ids=["first-allowed", "second-allowed"])
def test_ids_across_shards_are_refused_when_only_one_shard_allowed_duplicates(tmp_path, tiny_model_dir, allowed):
    fasta = write_fasta(tmp_path / "in.fa", [*RECORDS, ("r0", "MKV")])  # r0 in the first shard and the last
    for index in range(2):
        _shard(fasta, tmp_path / "emb", tiny_model_dir, index, 2, *(["--allow-duplicate-ids"] * (index == allowed)))
    result = _merge(tmp_path / "emb", tmp_path / "all.parquet")
    assert result.exit_code == 2, result.output  # a shard run without the flag never agreed to keep repeats
    assert "1 id(s) occur in more than one shard: 'r0' in shards 0, 1" in result.output
    assert not (tmp_path / "all.parquet").exists()


@pytest.mark.parametrize("part_format", ["parquet", "h5"])
def test_merge_into_hdf5_records_the_merged_identity_so_a_rerun_is_complete(tmp_path, tiny_model_dir, part_format):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS[:6])
    for index in range(2):
        _shard(fasta, tmp_path / "emb", tiny_model_dir, index, 2, "--format", part_format)
    out = tmp_path / "all.h5"
    assert _merge(tmp_path / "emb", out).exit_code == 0
    stamp = os.stat(out).st_mtime_ns
    again = _merge(tmp_path / "emb", out)
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    assert os.stat(out).st_mtime_ns == stamp  # nothing rewritten
