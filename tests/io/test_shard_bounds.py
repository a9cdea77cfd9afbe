"""Shards cover every record once, also when the shard count does not divide the record count (and when
there are more shards than records): on local paths and on S3 (moto on loopback), merged in input order."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_storage_shards import read_s3_table, s3, s3_endpoint  # noqa: F401 - the moto server fixtures

from esm2cli.cli import cli
from esm2cli.config import ShardConfig
from helpers import byte_shard_sizes, write_fasta

CASES = [(7, 2), (10, 3), (3, 5)]  # a remainder, a remainder over several shards, more shards than records


def records(n: int) -> list[tuple[str, str]]:
    return [(f"r{i}", "MKTAYIAKQRQ"[: 3 + i % 8] + "W" * (i % 3)) for i in range(n)]


@pytest.mark.parametrize("n, count", [*CASES, (1, 1), (5, 5), (100, 7), (1, 4), (0, 3)])
def test_shard_ranges_are_contiguous_complete_and_balanced(n, count):
    ranges = [ShardConfig(index=i, count=count).range(n) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n  # the last records are never dropped
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # no gap, no overlap
    sizes = [stop - start for start, stop in ranges]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1, sizes


def run_shards(fasta: str, out: str, model: str, count: int) -> None:
    for i in range(count):
        args = ["embed", fasta, "-o", out, "-m", model, "--dtype", "float32", "--devices", "cpu", "-q",
                "--shard-count", str(count), "--shard-index", str(i)]  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (i, result.output)


def merge(prefix: str, output: str) -> None:
    result = CliRunner().invoke(cli, ["merge", prefix, "-o", output])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("n, count", CASES)
def test_local_shards_with_a_remainder_hold_every_record(tmp_path, tiny_model_dir, n, count):
    recs = records(n)
    fasta = write_fasta(tmp_path / "in.fa", recs)
    run_shards(fasta, str(tmp_path / "emb"), tiny_model_dir, count)
    parts = [pq.read_table(tmp_path / "emb" / f"part-{i:05d}-of-{count:05d}.parquet") for i in range(count)]
    assert [p.num_rows for p in parts] == byte_shard_sizes(fasta, count)  # by the byte offset of each '>'
    assert [i for p in parts for i in p["id"].to_pylist()] == [rec_id for rec_id, _ in recs]
    merge(str(tmp_path / "emb"), str(tmp_path / "all.parquet"))
    merged = pq.read_table(tmp_path / "all.parquet")
    assert merged["id"].to_pylist() == [rec_id for rec_id, _ in recs]
    assert merged["length"].to_pylist() == [len(seq) for _, seq in recs]


@pytest.mark.parametrize("n, count", [(10, 3), (3, 5)])
def test_s3_shards_with_a_remainder_hold_every_record(s3, s3_endpoint, tiny_model_dir, n, count):  # noqa: F811
    client, bucket = s3
    recs = records(n)
    client.put_object(Bucket=bucket, Key="in.fa", Body="".join(f">{i}\n{s}\n" for i, s in recs).encode())
    run_shards(f"s3://{bucket}/in.fa", f"s3://{bucket}/emb", tiny_model_dir, count)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="emb/")["Contents"])
    assert keys == [f"emb/part-{i:05d}-of-{count:05d}.parquet" for i in range(count)]  # no work files left
    merge(f"s3://{bucket}/emb", f"s3://{bucket}/all.parquet")
    merged = read_s3_table(s3_endpoint, f"{bucket}/all.parquet")
    assert merged["id"].to_pylist() == [rec_id for rec_id, _ in recs]
