"""Object storage on a real S3-compatible server (moto) on loopback, shards, resume after SIGKILL, merge."""

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import s3fs
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.errors import StorageError
from esm2cli.io.storage import describe
from esm2cli.jobs.workload import synthetic_sequences
from helpers import byte_shard_sizes, write_fasta

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the kernel picks the port
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket; the environment points esm2cli (and subprocesses) at the server."""
    for key, value in CREDS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ESM2CLI_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=s3_endpoint, **{"region_name": "us-east-1"})
    bucket = f"b{time.time_ns()}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def env(**extra):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ESM2CLI_", "JOB_COMPLETION"))}
    if "ESM2CLI_S3_ENDPOINT_URL" in os.environ:
        base["ESM2CLI_S3_ENDPOINT_URL"] = os.environ["ESM2CLI_S3_ENDPOINT_URL"]
    return {**base, **extra}


def embed_args(fasta, out, model, *extra):
    return ["embed", str(fasta), "-o", str(out), "-m", model, "--dtype", "float32", *map(str, extra)]


def cli_ok(*args):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def read_s3_table(endpoint, path):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)


@pytest.fixture(scope="module")
def records():
    return list(synthetic_sequences(60, seed=21, max_length=600))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, records, tiny_model_dir):
    """A single local run over every record: what shards and resumed runs must reproduce."""
    work = tmp_path_factory.mktemp("reference")
    fa = write_fasta(work / "in.fa", records)
    cli_ok(*embed_args(fa, work / "ref.parquet", tiny_model_dir))
    return pq.read_table(work / "ref.parquet")


def test_embed_from_s3_to_s3(s3, s3_endpoint, tmp_path, records, tiny_model_dir, reference):
    client, bucket = s3
    text = "".join(f">{rec_id}\n{seq}\n" for rec_id, seq in records)
    client.put_object(Bucket=bucket, Key="in/proteins.fa.gz", Body=gzip.compress(text.encode()))
    cli_ok(*embed_args(f"s3://{bucket}/in/proteins.fa.gz", f"s3://{bucket}/out/emb.parquet", tiny_model_dir))
    table = read_s3_table(s3_endpoint, f"{bucket}/out/emb.parquet")
    assert table["id"].to_pylist() == reference["id"].to_pylist()
    np.testing.assert_allclose(
        np.array(table["embedding"].to_pylist()), np.array(reference["embedding"].to_pylist()), rtol=1e-5, atol=1e-6
    )
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["in/proteins.fa.gz", "out/emb.parquet"]  # no work files left behind


@pytest.mark.parametrize(
    "source, output, code, message",
    [
        ("s3://{bucket}/missing.fa", "out.parquet", 2, "no such file"),
        ("s3://no-such-bucket-esm2cli/x.fa", "out.parquet", 2, "no such"),
        ("{local}", "s3://no-such-bucket-esm2cli/out.parquet", 1, "no such bucket"),
    ],
)
def test_storage_errors_are_one_clear_line(s3, tmp_path, tiny_model_dir, source, output, code, message):
    _, bucket = s3
    local = write_fasta(tmp_path / "in.fa", [("a", "MKV")])
    out = output.replace("out.parquet", str(tmp_path / "o.parquet"))
    args = embed_args(source.format(bucket=bucket, local=local), out, tiny_model_dir)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_no_credentials_is_one_clear_line(s3_endpoint, monkeypatch, tmp_path, tiny_model_dir):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("ESM2CLI_S3_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    result = CliRunner().invoke(cli, embed_args("s3://bucket/x.fa", tmp_path / "o.parquet", tiny_model_dir))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "credentials" in result.output.lower() or "denied" in result.output.lower(), result.output


def test_denied_maps_to_one_line():
    assert "access denied" in str(describe(PermissionError("AccessDenied: nope"), "s3://b/k"))
    assert isinstance(describe(FileNotFoundError("x"), "s3://b/k"), StorageError)


def test_indexed_job_as_three_processes_equals_one_run(s3, s3_endpoint, records, tiny_model_dir, reference, reap):
    client, bucket = s3
    text = "".join(f">{rec_id}\n{seq}\n" for rec_id, seq in records)
    client.put_object(Bucket=bucket, Key="in.fa", Body=text.encode())
    cmd = [sys.executable, "-m", "esm2cli", *embed_args(f"s3://{bucket}/in.fa", f"s3://{bucket}/emb", tiny_model_dir)]
    procs = [
        subprocess.Popen(
            cmd, env=env(JOB_COMPLETION_INDEX=str(i), ESM2CLI_SHARD_COUNT="3"), stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for i in range(3)
    ]
    for proc in procs:
        reap(proc)
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    assert sorted(fs.ls(f"{bucket}/emb")) == [f"{bucket}/emb/part-0000{i}-of-00003.parquet" for i in range(3)]
    parts = [read_s3_table(s3_endpoint, f"{bucket}/emb/part-0000{i}-of-00003.parquet") for i in range(3)]
    assert [p.num_rows for p in parts] == byte_shard_sizes(text.encode(), 3)  # each shard: the '>' in its bytes
    ids = [i for p in parts for i in p["id"].to_pylist()]
    assert ids == reference["id"].to_pylist()  # in shard order the parts are the input order
    got = np.concatenate([np.array(p["embedding"].to_pylist()) for p in parts])
    np.testing.assert_allclose(got, np.array(reference["embedding"].to_pylist()), rtol=1e-5, atol=1e-6)
    dataset = ds.dataset(f"{bucket}/emb", filesystem=fs, format="parquet")
    assert sorted(dataset.to_table()["id"].to_pylist()) == sorted(ids)
    # a finished shard exits at once
    again = subprocess.run(cmd, env=env(JOB_COMPLETION_INDEX="1", ESM2CLI_SHARD_COUNT="3"), capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0 and "already complete" in again.stderr
    result = CliRunner().invoke(cli, ["merge", f"s3://{bucket}/emb", "-o", f"s3://{bucket}/all.parquet"])
    assert result.exit_code == 0, result.output
    merged = read_s3_table(s3_endpoint, f"{bucket}/all.parquet")
    assert merged["id"].to_pylist() == reference["id"].to_pylist()


def test_local_parts_read_as_one_dataset_and_merge(tmp_path, records, tiny_model_dir, reference):
    fa = write_fasta(tmp_path / "in.fa", records)
    for i in range(4):
        cli_ok(*embed_args(fa, tmp_path / "emb", tiny_model_dir, "--shard-count", 4, "--shard-index", i))
    import duckdb
    import polars as pl

    assert sorted(pq.read_table(tmp_path / "emb")["id"].to_pylist()) == sorted(reference["id"].to_pylist())
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'emb'}/*.parquet'").fetchall()[0][0] == 60
    assert pl.read_parquet(tmp_path / "emb" / "*.parquet").height == 60
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "emb"), "-o", str(tmp_path / "all.parquet")])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "all.parquet")["id"].to_pylist() == reference["id"].to_pylist()


def test_merge_names_missing_shards(tmp_path, records, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", records)
    cli_ok(*embed_args(fa, tmp_path / "emb", tiny_model_dir, "--shard-count", 3, "--shard-index", 1))
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "emb"), "-o", str(tmp_path / "all.parquet")])
    assert result.exit_code == 2 and "2 of 3 shards are not finished: 0, 2" in result.output


def test_merge_calls_an_unreadable_part_unreadable_not_another_run(tmp_path, records, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", records[:6])
    for i in range(2):
        cli_ok(*embed_args(fa, tmp_path / "emb", tiny_model_dir, "--shard-count", 2, "--shard-index", i))
    part = tmp_path / "emb" / "part-00001-of-00002.parquet"
    part.write_bytes(part.read_bytes()[:100])  # cut short (a copy that failed, a full disk)
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "emb"), "-o", str(tmp_path / "all.parquet")])
    assert result.exit_code == 2, result.output
    assert "part-00001-of-00002.parquet cannot be read as a part of an esm2cli run (truncated" in result.output
    assert "another run" not in result.output and not (tmp_path / "all.parquet").exists()


def test_shard_options_are_checked(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKV")])
    result = CliRunner().invoke(cli, embed_args(fa, tmp_path / "emb", tiny_model_dir, "--shard-count", 2))
    assert result.exit_code == 2 and "JOB_COMPLETION_INDEX" in result.output
    result = CliRunner().invoke(cli, embed_args(fa, tmp_path / "emb", tiny_model_dir, "--shard-count", 2,
                                                "--shard-index", 2))  # fmt: skip
    assert result.exit_code == 2 and "not below --shard-count 2" in result.output


def _kill_when_chunks(proc, work: Path, chunks: int, timeout: float = 240, log: Path | None = None) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = len(list(work.glob("chunk-*.parquet"))) if work.exists() else 0
        if done >= chunks:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return done
        time.sleep(0.05)
    said = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise AssertionError(f"the run ended or stalled before {chunks} chunks: {proc.poll()}\n{said}")


def _summary(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("embedded"))


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_sigkill_mid_run_then_rerun_completes_without_duplicates(tmp_path, sharded, reap):
    """The 8M architecture with random weights: slow enough on the CPU to be killed half-way."""
    proteins = list(synthetic_sequences(48, seed=4, max_length=500))
    fa = write_fasta(tmp_path / "in.fa", proteins)
    out = tmp_path / ("emb" if sharded else "out.parquet")
    extra = ["--shard-count", "2", "--shard-index", "1"] if sharded else []
    cmd = [sys.executable, "-m", "esm2cli", "embed", fa, "-o", str(out), "-m", "esm2_t6_8M", "--load-format", "dummy",
           "--dtype", "float32", "--chunk-size", "4", *extra]  # fmt: skip
    target = out / "part-00001-of-00002.parquet" if sharded else out
    work = target.parent / f"_{target.name}.parts"
    expected = [rec_id for rec_id, _ in (proteins[24:] if sharded else proteins)]

    fresh = subprocess.run([*cmd[:6], str(tmp_path / "fresh"), *cmd[7:]], env=env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    fresh_line = _summary(fresh.stderr)
    fresh_target = (tmp_path / "fresh" / "part-00001-of-00002.parquet") if sharded else tmp_path / "fresh"
    fresh_table = pq.read_table(fresh_target)

    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=stderr)
    reap(proc)
    kept = _kill_when_chunks(proc, work, chunks=3, log=log)
    assert not target.exists()
    rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    line = _summary(rerun.stderr).replace(",", "")
    resumed = int(line.split(" resumed")[0].rsplit(" ", 1)[-1])
    computed_rerun = int(line.split()[1])
    assert resumed >= 4 * kept and computed_rerun + resumed == len(expected)
    table = pq.read_table(target)
    assert table["id"].to_pylist() == expected  # complete, in order, no duplicates
    np.testing.assert_allclose(
        np.array(table["embedding"].to_pylist()), np.array(fresh_table["embedding"].to_pylist()), rtol=1e-5, atol=1e-6
    )
    assert not work.exists()
    assert computed_rerun < int(fresh_line.split()[1].replace(",", ""))  # it did not start over


def test_reuse_of_outputs_on_s3_a_file_and_a_prefix_of_parts(s3, s3_endpoint, tmp_path, records, tiny_model_dir,
                                                             reference):  # fmt: skip
    client, bucket = s3
    old_fa = write_fasta(tmp_path / "old.fa", records[:40])
    cli_ok(*embed_args(old_fa, f"s3://{bucket}/old/all.parquet", tiny_model_dir))
    for i in range(2):
        cli_ok(*embed_args(old_fa, f"s3://{bucket}/parts/", tiny_model_dir, "--shard-count", 2, "--shard-index", i))
    new_fa = write_fasta(tmp_path / "new.fa", records)
    for source in (f"s3://{bucket}/old/all.parquet", f"s3://{bucket}/parts"):
        out = f"s3://{bucket}/new-{len(source)}.parquet"
        result = cli_ok(*embed_args(new_fa, out, tiny_model_dir, "--reuse", source))
        assert "40 reused from s3://" in result.stderr and "20 computed" in result.stderr
        table = read_s3_table(s3_endpoint, out.removeprefix("s3://"))
        assert table["id"].to_pylist() == reference["id"].to_pylist()
        np.testing.assert_allclose(
            np.array(table["embedding"].to_pylist()), np.array(reference["embedding"].to_pylist()), rtol=0, atol=1e-5
        )
