"""esm2cli index and esm2cli search through Click: exit codes, one-line refusals, hits on stdout, shards from the
environment, a second build of one database refused naming the first."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.search import manifest

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model_dir):
    from helpers import embed_mean_and_bos, random_protein

    records = [(f"p{i}", random_protein(15 + 11 * i)) for i in range(10)]
    root = embed_mean_and_bos(tmp_path_factory.mktemp("cli-search"), records, tiny_model_dir)
    assert run("index", root / "out.parquet", "-o", root / "db", "--decoys", "0", "-q").exit_code == 0
    return root


def test_index_then_search_a_fasta_to_stdout(outputs):
    result = run("search", outputs / "in.fasta", "-d", outputs / "db", "-o", "-", "-k", "2", "--devices", "cpu", "-q")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "query\ttarget\tscore\tevalue\trank" and len(lines) == 1 + 2 * 10
    assert lines[1].startswith("p0\tp0\t1.000000\tNA\t1")


def test_search_writes_m8_that_parses(outputs, tmp_path):
    result = run("search", outputs / "out.parquet", "-d", outputs / "db", "-o", tmp_path / "h.m8", "--format", "m8")
    assert result.exit_code == 0, result.output
    assert "searched 10 queries against 10 vectors: 100 hits" in result.stderr
    table = pd.read_csv(tmp_path / "h.m8", sep="\t", header=None)
    assert table.shape == (100, 12) and (table[4] == 0).all()


def test_a_rerun_of_index_is_already_complete(outputs):
    result = run("index", outputs / "out.parquet", "-o", outputs / "db", "--decoys", "0")
    assert result.exit_code == 0 and "is already complete" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], r"-k 0: the database .* holds 10 vectors"),
        (["-k", "11"], r"-k 11: the database"),
        (["--dtype", "bfloat16", "--devices", "cpu"], r"dtype was 'float32', now 'bfloat16'"),
        (["--max-evalue", "1"], r"--max-evalue: .* has no null model"),
        (["--min-score", "nan"], r"--min-score nan: not a number"),
        (["--max-evalue", "nan"], r"--max-evalue nan: give an E-value of 0 or more"),
        (["--max-evalue", "-1"], r"--max-evalue -1.0: give an E-value of 0 or more"),
    ],
)  # fmt: skip
def test_bad_search_requests_exit_2_in_one_line_writing_nothing(outputs, tmp_path, args, message):
    result = run("search", outputs / "in.fasta", "-d", outputs / "db", "-o", tmp_path / "h.tsv", *args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    import re

    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "h.tsv").exists()


@pytest.mark.parametrize(
    "target", ["db/manifest.json", "db/shard-00000-of-00001/ids.parquet", "in.fasta", "out.parquet"]
)
def test_search_refuses_to_write_its_hits_over_the_database_or_the_query(outputs, tmp_path, target):
    # A copy per case: a write that got through would spoil the module's shared database and query.
    root = tmp_path / "copy"
    shutil.copytree(outputs, root)
    query = root / (target if target in ("in.fasta", "out.parquet") else "in.fasta")
    before = (root / target).read_bytes()
    result = run("search", query, "-d", root / "db", "-o", root / target, "--overwrite", "--devices", "cpu")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and f"{target}: is the input" in result.stderr
    assert (root / target).read_bytes() == before


@pytest.mark.parametrize("option", [["--model", "esm2_t6_8M"], ["--dtype", "bfloat16"], ["--load-format", "dummy"]])
def test_a_model_option_beside_an_output_query_is_refused_not_ignored(outputs, tmp_path, option):
    result = run("search", outputs / "out.parquet", "-d", outputs / "db", "-o", tmp_path / "h.tsv", *option)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"out.parquet holds vectors already: {option[0]} applies to a FASTA query only" in result.stderr
    assert not (tmp_path / "h.tsv").exists()


def test_a_query_output_of_another_model_and_a_bad_database_exit_2(outputs, tmp_path):
    result = run("search", outputs / "bos.parquet", "-d", outputs / "db", "-o", tmp_path / "h.tsv")
    assert result.exit_code == 2 and "pooling was 'mean', now 'bos'" in result.stderr
    result = run("search", outputs / "out.parquet", "-d", tmp_path, "-o", tmp_path / "h.tsv")
    assert result.exit_code == 2 and "manifest.json: missing" in result.stderr


def test_bad_index_inputs_exit_2_in_one_line(outputs, tmp_path):
    result = run("index", outputs / "out.parquet", outputs / "bos.parquet", "-o", tmp_path / "db")
    assert result.exit_code == 2 and "bos.parquet: vectors of another run" in result.stderr
    result = run("index", outputs / "in.fasta", "-o", tmp_path / "db")
    assert result.exit_code == 2 and "in.fasta: not an esm2cli output" in result.stderr
    assert not (tmp_path / "db").exists()


def test_shards_come_from_the_indexed_job_index(outputs, tmp_path, monkeypatch):
    for i in range(2):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(i))
        result = run("index", outputs / "out.parquet", "-o", tmp_path / "db", "--decoys", "0", "--shard-count", "2")
        assert result.exit_code == 0, result.output
    assert sorted(manifest.shard_folders(str(tmp_path / "db"))) == [manifest.shard_name(i, 2) for i in range(2)]
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    result = run("index", outputs / "out.parquet", "-o", tmp_path / "db2", "--shard-index", "1")
    assert result.exit_code == 2 and "needs --shard-count" in result.output
    a = run("search", outputs / "out.parquet", "-d", tmp_path / "db", "-o", "-", "-q")
    b = run("search", outputs / "out.parquet", "-d", outputs / "db", "-o", "-", "-q")
    assert a.exit_code == 0 and a.stdout == b.stdout


def test_a_second_build_of_one_database_exits_2_naming_the_first(outputs, tmp_path, reap):
    """A real build stopped (SIGSTOP) while it holds its shard's lock, and a second build toward the database."""
    from helpers import write_like

    vectors = np.random.default_rng(0).standard_normal((200_000, 32)).astype(np.float32)
    big = write_like(outputs / "out.parquet", tmp_path / "big.parquet", vectors, row_group_size=5000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "esm2cli", "index", big, "-o", str(tmp_path / "db"), "--decoys", "0", "-q"]
    lock = tmp_path / "db" / ".shard-00000-of-00001.lock"
    for _ in range(5):
        first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
        reap(first)
        while first.poll() is None and not (lock.exists() and lock.stat().st_size):
            time.sleep(0.001)
        if first.poll() is None:
            break
        shutil.rmtree(tmp_path / "db")  # it finished first: again
    else:
        pytest.fail("the first build always finished before it could be stopped")
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = run("index", big, "-o", tmp_path / "db", "--decoys", "0")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.exit_code == 2, second.output
    assert f"pid {first.pid}" in second.stderr and "being written by another esm2cli run" in second.stderr
    assert first.wait(timeout=120) == 0  # the first goes on and completes
    assert run("search", outputs / "out.parquet", "-d", tmp_path / "db", "-o", "-", "-k", "1", "-q").exit_code == 0


def test_a_fasta_query_with_another_model_exits_2_naming_the_weights(outputs, tmp_path):
    from helpers import build_tiny_esm2

    other = build_tiny_esm2(tmp_path / "other", seed=8)  # the same architecture, other weights
    result = run("search", outputs / "in.fasta", "-d", outputs / "db", "-o", tmp_path / "h.tsv", "-m", other,
                 "--devices", "cpu")  # fmt: skip
    assert result.exit_code == 2 and "the model's weights changed" in result.stderr, result.output
    assert not (tmp_path / "h.tsv").exists()


def test_held_out_decoys_average_about_one_hit_at_evalue_one(tmp_path, tiny_model_dir):
    """The whole path with the real null: index fits it on decoys; shuffles it never saw, searched as a FASTA,
    hit about once each at E <= 1 (Poisson: 300 queries put the mean within 0.8-1.2 nearly always)."""
    from esm2cli.search import null
    from esm2cli.search.vectors import open_inputs
    from helpers import embed_cli, random_protein, write_fasta

    fasta = write_fasta(tmp_path / "db.fasta", [(f"p{n}", random_protein(n)) for n in range(20, 170)])
    embed_cli(fasta, tmp_path / "db.parquet", tiny_model_dir, check=True)
    built = run("index", tmp_path / "db.parquet", "-o", tmp_path / "db", "--decoys", "300", "--devices", "cpu")
    assert built.exit_code == 0, built.output
    held_out, _ = null.decoy_sequences(open_inputs([str(tmp_path / "db.parquet")]), fasta, 300, seed=7)
    queries = write_fasta(tmp_path / "decoys.fasta", [(f"d{i}", seq) for i, seq in enumerate(held_out)])
    result = run("search", queries, "-d", tmp_path / "db", "-o", tmp_path / "hits.tsv", "-k", "150",
                 "--max-evalue", "1", "--devices", "cpu", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    hits = pd.read_csv(tmp_path / "hits.tsv", sep="\t")
    assert (hits["evalue"] <= 1).all()
    assert 0.5 <= len(hits) / len(held_out) <= 2.0, len(hits)


def _limited_files() -> None:
    """In the child: writes past 1 KB fail with EFBIG (a full disk, as `ulimit -f` makes one) instead of killing it."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


@pytest.mark.parametrize("command", ["index", "search"])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(outputs, tmp_path, command):
    target = tmp_path / ("db" if command == "index" else "h.tsv")
    args = ["-o", target, "--decoys", "0"] if command == "index" else ["-d", outputs / "db", "-o", target]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "esm2cli", command, outputs / "out.parquet", *args, "-q"]
    done = subprocess.run(list(map(str, argv)), env=env, capture_output=True, text=True, preexec_fn=_limited_files)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {target}") and "File too large" in lines[0], lines
    assert not target.exists() or not any(target.iterdir())


def test_hits_on_a_full_stdout_are_one_line_and_exit_1(outputs, tmp_path):
    # unbuffered (as the image runs it), stdout is the raw file: its short write at the limit lost the rest, exit 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "esm2cli", "search", outputs / "out.parquet", "-d", outputs / "db", "-o", "-", "-q"]
    with open(tmp_path / "h.tsv", "wb") as stdout:
        done = subprocess.run(list(map(str, argv)), env=env, stdout=stdout, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_limited_files)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == ["Error: -: cannot write (File too large)"]


def test_an_invalid_fasta_query_is_refused_without_advising_an_option_search_lacks(outputs, tmp_path):
    (tmp_path / "bad.fasta").write_text(">x\nMKT*J1\n")
    result = run("search", tmp_path / "bad.fasta", "-d", outputs / "db", "-o", tmp_path / "h.tsv", "--devices", "cpu")
    assert result.exit_code == 2, result.output
    assert "bad.fasta: 1 of 1 records cannot be embedded" in result.stderr and "record #1 'x'" in result.stderr
    assert "--skip-invalid" not in result.stderr  # `esm2cli search --help` has no such option
    assert not (tmp_path / "h.tsv").exists()
