"""One run per output: embed, score and merge take the output's lock; a second live run exits 2 naming the holder.

And the temporary file a run writes beside its output is its own, so that two writers never share one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.errors import OutputLockedError
from esm2cli.io.lock import OutputLock, lock_path
from esm2cli.io.storage import AtomicFile
from helpers import embed_cli, write_fasta

HOLD = """
import sys, time
from esm2cli.io.lock import OutputLock
with OutputLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(reap):
    """Starts another process holding a target's lock, as a live run does; returns its pid."""

    def start(target) -> int:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, env=env, text=True)
        reap(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc.pid

    return start


def assert_refused(result, target, pid: int) -> None:
    assert result.exit_code == 2, result.output
    line = f"{target} is being written by another esm2cli run (pid {pid} on {socket.gethostname()}, since "
    assert line in result.output, result.output
    assert "Traceback" not in result.output


def test_a_second_score_run_onto_one_output_exits_2_naming_the_holder(tmp_path, tiny_model_dir, holder):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKTAYIAKQR"), ("b", "GSHMLEDPV")])
    out = tmp_path / "scores.parquet"
    pid = holder(out)
    args = ["score", fa, "-o", str(out), "--pll", "-m", tiny_model_dir, "--dtype", "float32", "--devices", "cpu"]
    assert_refused(CliRunner().invoke(cli, args), out, pid)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_second_merge_onto_one_output_exits_2_naming_the_holder(tmp_path, tiny_model_dir, holder):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKTAYIAKQR"), ("b", "GSHMLEDPV")])
    parts = tmp_path / "parts"
    for index in range(2):
        args = ["embed", fa, "-o", str(parts), "-m", tiny_model_dir, "--dtype", "float32", "--devices", "cpu",
                "--shard-index", str(index), "--shard-count", "2"]  # fmt: skip
        assert CliRunner().invoke(cli, args).exit_code == 0
    out = tmp_path / "merged.parquet"
    pid = holder(out)
    assert_refused(CliRunner().invoke(cli, ["merge", str(parts), "-o", str(out)]), out, pid)
    assert not out.exists()


def test_once_the_holder_is_gone_the_next_run_goes_ahead(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKTAYIAKQR")])
    out = tmp_path / "scores.parquet"
    with OutputLock(str(out)):
        with pytest.raises(OutputLockedError):
            OutputLock(str(out)).__enter__()  # a second run in the same process (the Python API)
    args = ["score", fa, "-o", str(out), "--pll", "-m", tiny_model_dir, "--dtype", "float32", "--devices", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out)["id"].to_pylist() == ["a"]
    assert not os.path.exists(lock_path(str(out)))  # released


def test_two_writers_toward_one_path_write_two_temporary_files(tmp_path):
    target = tmp_path / "out.bin"
    first, second = AtomicFile(target), AtomicFile(target)
    assert first.tmp != second.tmp and str(os.getpid()) in os.path.basename(first.tmp)
    first.handle.write(b"first")
    second.handle.write(b"second")
    first.commit()
    assert target.read_bytes() == b"first"
    second.commit()  # its own file is still there to rename (one shared name: "no such file")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_an_aborted_writer_leaves_the_other_one_alone(tmp_path):
    target = tmp_path / "out.bin"
    first, second = AtomicFile(target), AtomicFile(target)
    first.handle.write(b"kept")
    second.abort()
    first.commit()
    assert target.read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_run_sweeps_the_temporary_file_a_killed_run_left_beside_its_output(tmp_path, tiny_model_dir):
    # A run killed before its commit (SIGKILL, a second Ctrl-C) left its .<name>.<pid>-<hex>.tmp for ever.
    out = tmp_path / "o.parquet"
    code = (
        "import os, sys, pyarrow as pa; from esm2cli.io.parquet import TableWriter\n"
        "w = TableWriter(sys.argv[1], pa.schema([('id', pa.string())])); w.write_columns({'id': ['a'] * 10})\n"
        "w.flush(); print(w._file.tmp, flush=True); os.kill(os.getpid(), 9)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env)
    left = killed.stdout.strip()
    assert killed.returncode == -9 and os.path.exists(left) and not out.exists()
    mine = tmp_path / f".o.parquet.{os.getpid()}-0123abcd.tmp"  # a live process's: kept
    mine.write_bytes(b"x")
    fasta = write_fasta(tmp_path / "in.fa", [("a", "MKV"), ("b", "MKVLA")])
    assert embed_cli(fasta, out, tiny_model_dir).exit_code == 0
    assert not os.path.exists(left) and mine.exists() and pq.read_table(out).num_rows == 2
