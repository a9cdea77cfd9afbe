"""Adversarial review 3 of byte-range shards, Slurm arrays, float16 storage, ESM C and the trust fixes: defects
found, as strict xfails (each passes while the defect exists and fails once it is fixed).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import write_fasta
from esm2cli.cli import cli
from esm2cli.config import ShardConfig
from esm2cli.io.split import shard_source


def shard_ids(path: str, count: int) -> list[str]:
    ids = []
    for index in range(count):
        with shard_source(path, path, ShardConfig(index=index, count=count)) as source:
            ids += [record.id for record in source.records()]
    return ids


@pytest.mark.xfail(
    strict=True,
    reason="with more shards than bytes, every shard whose slice starts at byte 0 (even an empty slice [0, 0)) "
    "takes the first record: it is embedded by several shards, against 'every record in exactly one shard'",
)
def test_more_shards_than_bytes_hold_every_record_once(tmp_path):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK"), ("p2", "GGSS")])  # 22 bytes
    assert sorted(shard_ids(fasta, 50)) == ["p1", "p2"]


@pytest.mark.xfail(
    strict=True,
    reason="a Slurm task whose SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN gives shard -1, which is not "
    "checked: the run dies with an OSError traceback (seek to a negative offset) instead of one line",
)
def test_slurm_task_id_below_min_is_one_line(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK"), ("p2", "GGSS")])
    env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    result = CliRunner().invoke(
        cli, ["embed", fasta, "-o", str(tmp_path / "out"), "-m", tiny_model_dir, "--devices", "cpu"], env=env
    )
    assert result.exit_code == 2, result.output
    assert "SLURM_ARRAY_TASK_ID" in result.output
