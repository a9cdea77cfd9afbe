"""Byte-range shards (esm2cli.io.split): every record in exactly one shard, for plain and BGZF files, local and
through fsspec, and a shard reads its slice plus at most one record and a small read-ahead."""

from __future__ import annotations

import gzip
import random

import fsspec
import pytest
from Bio import bgzf
from click.testing import CliRunner
from fsspec.implementations.local import LocalFileSystem

from esm2cli.cli import cli
from esm2cli.config import ShardConfig
from esm2cli.io.fasta import read_records
from esm2cli.io.split import detect_format, open_slice, shard_source, slice_range
from helpers import header_offsets, write_fasta


class CountingFileSystem(LocalFileSystem):
    """Local files under a URL of their own (counted://), counting every byte a read returns."""

    protocol = ("counted",)
    bytes_read = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("counted://"))

    def _open(self, path, mode="rb", **kwargs):
        handle = super()._open(path, mode, **kwargs)
        read = handle.read

        def counted(*args):
            data = read(*args)
            CountingFileSystem.bytes_read += len(data)
            return data

        handle.read = counted
        return handle


fsspec.register_implementation("counted", CountingFileSystem, clobber=True)


def mixed_fasta(n: int, seed: int = 3, long_every: int = 0) -> tuple[bytes, list[tuple[str, str]]]:
    """Records with mixed line widths, LF and CRLF endings, blank lines; every long_every-th one very long."""
    rng = random.Random(seed)
    text, records = [], []
    for i in range(n):
        length = 20_000 if long_every and i % long_every == 1 else rng.choice([1, 7, 60, 333, 1500])
        seq = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(length))
        width, newline = rng.choice([7, 60, 61, 80, 1000]), rng.choice(["\n", "\r\n"])
        lines = "".join(seq[j : j + width] + newline for j in range(0, len(seq), width))
        text.append(f">p{i} desc {i} a>b{newline}{lines}" + (newline if i % 5 == 0 else ""))
        records.append((f"p{i}", seq))
    return "".join(text).encode(), records


def read_shards(url: str, count: int, fmt: str) -> list[list[tuple[str, str]]]:
    shards = []
    for index in range(count):
        with open_slice(url, index, count, fmt) as piece:
            shards.append([(r.id, r.sequence) for r in read_records(piece.path, span=piece.span)])
    return shards


def test_format_is_read_from_the_bytes_not_the_name(tmp_path):
    data, _ = mixed_fasta(5)
    with bgzf.BgzfWriter(str(tmp_path / "a.txt"), "wb") as out:
        out.write(data)
    assert detect_format((tmp_path / "a.txt").read_bytes()[:18]) == "bgzf"
    assert detect_format(gzip.compress(data)[:18]) == "gzip"
    assert detect_format(data[:18]) == "plain"


@pytest.mark.parametrize("count", [1, 2, 7, 40, 400])
def test_local_plain_shards_hold_every_record_once_in_order(tmp_path, count):
    data, records = mixed_fasta(120, long_every=30)
    path = tmp_path / "in.fa"
    path.write_bytes(data)
    shards = read_shards(str(path), count, "plain")
    assert [rec for shard in shards for rec in shard] == records
    # each record is in the shard whose byte range holds its '>' (found independently of the reader)
    owner = [next(i for i in range(count) if o < slice_range(len(data), i, count)[1]) for o in header_offsets(data)]
    assert [len(shard) for shard in shards] == [owner.count(i) for i in range(count)]


def test_a_record_longer_than_a_slice_lands_in_one_shard_and_the_others_are_empty(tmp_path):
    data = b">short\nMKV\n>long\n" + b"A" * 5000 + b"\n>last\nW\n"
    path = tmp_path / "in.fa"
    path.write_bytes(data)
    shards = read_shards(str(path), 50, "plain")
    assert [rec[0] for shard in shards for rec in shard] == ["short", "long", "last"]
    assert [len(shard) for shard in shards if shard] == [2, 1]  # short and long start in the first ~100 bytes
    assert [rec[0] for rec in shards[-1]] == ["last"]


def test_a_byte_order_mark_and_leading_blank_lines_stay_with_the_first_record(tmp_path):
    data = "\ufeff\n\n>a\nMKV\n>b\nMK\n".encode()
    path = tmp_path / "in.fa"
    path.write_bytes(data)
    for count in (1, 2, 3, 9):
        assert [rec[0] for shard in read_shards(str(path), count, "plain") for rec in shard] == ["a", "b"]


@pytest.mark.parametrize("count", [1, 3, 7, 60])
def test_bgzf_shards_split_on_blocks_hold_every_record_once(tmp_path, count):
    data, records = mixed_fasta(150, long_every=40)
    path = tmp_path / "in.fa.gz"
    with bgzf.BgzfWriter(str(path), "wb") as out:
        out.write(data)
    shards = read_shards(str(path), count, "bgzf")
    assert [rec for shard in shards for rec in shard] == records


@pytest.mark.parametrize("count", [1, 7, 100])
def test_a_shard_through_fsspec_reads_its_slice_and_at_most_a_record_more(tmp_path, count):
    data, records = mixed_fasta(200)
    path = tmp_path / "in.fa"
    path.write_bytes(data)
    longest = max(len(data[a:b]) for a, b in zip(header_offsets(data), header_offsets(data)[1:], strict=False))
    got = []
    for index in range(count):
        CountingFileSystem.bytes_read = 0
        with open_slice(f"counted://{path}", index, count, "plain") as piece:
            got += [(r.id, r.sequence) for r in read_records(piece.path, span=piece.span)]
        start, stop = slice_range(len(data), index, count)
        assert piece.bytes_read == CountingFileSystem.bytes_read  # the reader's count is the filesystem's
        assert CountingFileSystem.bytes_read <= (stop - start) + longest + (256 << 10), index
    assert got == records


def test_a_bgzf_shard_reads_its_slice_and_a_few_blocks_more(tmp_path):
    data, records = mixed_fasta(600, seed=5)
    path = tmp_path / "in.fa.gz"
    with bgzf.BgzfWriter(str(path), "wb") as out:
        out.write(data)
    size, count = path.stat().st_size, 9
    got = []
    for index in range(count):
        CountingFileSystem.bytes_read = 0
        with open_slice(f"counted://{path}", index, count, "bgzf") as piece:
            got += [(r.id, r.sequence) for r in read_records(piece.path)]
        assert CountingFileSystem.bytes_read <= size // count + 4 * (1 << 16) + 100, index  # 64 KiB blocks at most
    assert got == records


def shard_ids(path: str, count: int) -> list[str]:
    ids = []
    for index in range(count):
        with shard_source(path, path, ShardConfig(index=index, count=count)) as source:
            ids += [record.id for record in source.records()]
    return ids


def test_more_shards_than_bytes_hold_every_record_once(tmp_path):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK"), ("p2", "GGSS")])  # 22 bytes
    assert sorted(shard_ids(fasta, 50)) == ["p1", "p2"]


def test_more_bgzf_shards_than_bytes_hold_every_record_once(tmp_path):
    plain = open(write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK"), ("p2", "GGSS")]), "rb").read()
    path = tmp_path / "a.fa.gz"
    with bgzf.BgzfWriter(str(path), "wb") as out:
        out.write(plain)
    count = 4 * path.stat().st_size  # several shards start at byte 0, where the first block (both records) is
    assert slice_range(path.stat().st_size, 1, count)[0] == 0
    assert sorted(shard_ids(str(path), count)) == ["p1", "p2"]


def test_shards_of_stdin_merge(tmp_path, tiny_model_dir):
    import pyarrow.parquet as pq

    records = [(f"p{i}", "MKTAYIAKQRQISFVKSHFSRQ"[: 5 + i]) for i in range(6)]
    data = open(write_fasta(tmp_path / "a.fa", records)).read()
    parts = tmp_path / "parts"
    for index in range(2):
        result = CliRunner().invoke(
            cli,
            ["embed", "-", "-o", str(parts), "-m", tiny_model_dir, "--devices", "cpu", "--dtype", "float32",
             "--shard-count", "2", "--shard-index", str(index)],
            input=data,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    merged = tmp_path / "all.parquet"
    result = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert pq.read_table(merged).column("id").to_pylist() == [r[0] for r in records]


def _bgzf_cut_at_a_block_boundary(tmp_path, records) -> str:
    """A BGZF copy of ``records`` cut at a block boundary inside a sequence (as a bgzip killed mid-way leaves it:
    whole blocks, no end-of-file marker)."""
    from esm2cli.io.split import bgzf_block_size

    plain = open(write_fasta(tmp_path / "a.fa", records), "rb").read()
    path = tmp_path / "a.fa.gz"
    with bgzf.BgzfWriter(str(path), "wb") as out:
        for at in range(0, len(plain), 50):
            out.write(plain[at : at + 50])
            out.flush()
    data = path.read_bytes()
    starts, at = [], 0
    while at < len(data):
        starts.append(at)
        at += bgzf_block_size(data, at)
    path.write_bytes(data[: starts[3]])  # 150 bytes of text: inside the second record's sequence
    return str(path)


@pytest.mark.parametrize("sharded", [False, True])
def test_bgzf_without_its_eof_marker_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, sharded):
    records = [("p1", "MKTAYIAKQRQISFVKSHFSRQ" * 3), ("p2", "GGSSLLKKVVAA" * 12)]
    source = _bgzf_cut_at_a_block_boundary(tmp_path, records)
    out = tmp_path / "out"
    shard = ["--shard-count", "1", "--shard-index", "0"] if sharded else []
    result = CliRunner().invoke(
        cli, ["embed", source, "-o", str(out), "-m", tiny_model_dir, "--devices", "cpu", *shard]
    )
    assert result.exit_code == 2, result.output  # docs/embed.md: cut short, so refused (p2 would be short)
    assert f"{source}: BGZF without its end-of-file block: the file was cut short" in result.output
    assert not out.is_file() and not list(out.rglob("*"))  # no output, no part (a shard's folder may be made)
