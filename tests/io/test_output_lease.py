"""The object-store lease (moto's S3 on loopback): a second writer toward the same output is refused while the
first lives, also from the same process; the holder renews its lease; a lease not renewed is taken over;
release removes it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from test_storage_shards import env, s3, s3_endpoint  # noqa: F401 - the moto server fixtures

from esm2cli.errors import OutputLockedError
from esm2cli.io import lock
from esm2cli.io.lock import OutputLock


def read_lease(client, bucket, key="emb/.out.parquet.lock") -> dict | None:
    try:
        return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(s3, tmp_path, tiny_model_dir):  # noqa: F811
    client, bucket = s3
    target = f"s3://{bucket}/emb/out.parquet"
    client.put_object(Bucket=bucket, Key="in.fa", Body=b">a\nMKV\n")
    with OutputLock(target):
        lease = read_lease(client, bucket)
        assert lease["expires"] > time.time() + lock.LEASE_S / 2
        with pytest.raises(OutputLockedError, match=r"being written by another esm2cli run \(pid \d+ on "):
            OutputLock(target).__enter__()  # the same process, a second run (the Python API from two threads)
        cmd = [sys.executable, "-m", "esm2cli", "embed", f"s3://{bucket}/in.fa", "-o", target, "-m", tiny_model_dir,
               "--dtype", "float32", "--devices", "cpu"]  # fmt: skip
        other = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
        assert other.returncode == 2, other.stderr
        assert "is being written by another esm2cli run" in other.stderr and "Traceback" not in other.stderr
        assert read_lease(client, bucket) == lease  # the refused run did not touch the holder's lease
    assert read_lease(client, bucket) is None  # released
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="emb/")  # and no output was written


def test_the_holder_renews_its_lease(s3, monkeypatch):  # noqa: F811
    client, bucket = s3
    monkeypatch.setattr(lock, "RENEW_S", 0.05)
    with OutputLock(f"s3://{bucket}/emb/out.parquet"):
        first = read_lease(client, bucket)["expires"]
        deadline = time.time() + 20
        while (lease := read_lease(client, bucket)) and lease["expires"] == first:
            assert time.time() < deadline, "the lease was never renewed"
            time.sleep(0.02)
        assert lease["expires"] > first
    assert read_lease(client, bucket) is None


@pytest.mark.parametrize("body", [b"not json", None], ids=["garbage", "expired"])
def test_a_lease_not_renewed_is_taken_over(s3, body):  # noqa: F811
    client, bucket = s3
    dead = {"holder": {"host": "elsewhere", "pid": 1, "since": "2020-01-01 00:00:00"}, "expires": time.time() - 1}
    client.put_object(Bucket=bucket, Key="emb/.out.parquet.lock", Body=body or json.dumps(dead).encode())
    with OutputLock(f"s3://{bucket}/emb/out.parquet"):
        assert read_lease(client, bucket)["holder"]["host"] != "elsewhere"
    assert read_lease(client, bucket) is None
