"""esm2cli score as a new user meets it: bad CSVs and FASTAs, options, existing outputs, large lists."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from helpers import fed_fifo, run_esm2cli, write_fasta

WT = [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "GSHMKVLAAGIVGL")]


@pytest.fixture
def wt(tmp_path):
    return write_fasta(tmp_path / "wt.fa", WT)


def csv(tmp_path, text, name="m.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def score(tiny_model_dir, *args, input=None):
    args = ["score", *map(str, args), "-m", tiny_model_dir, "--dtype", "float32"]
    return CliRunner().invoke(cli, args, input=input)


@pytest.mark.parametrize(
    "text, named",
    [
        ("id,mutant\np1,M1A\np9,G1W\n", "line 3 ('p9', 'G1W'): unknown id 'p9' (not in the FASTA)"),
        ("id,mutant\np1,A40G\n", "line 2 ('p1', 'A40G'): A40G: position 40 is past the end of the sequence (22"),
        ("id,mutant\np1,X3A\n", "the wild type has 'T' at position 3, not 'X'"),
        ("id,mutant\np1,M1*\n", "a stop (*) is not an ESM-2 residue"),
        ("id,mutant\np1,M1A;K2G\n", "is not a substitution such as A24G"),
        ("id,mutant\np1,\n", "line 2 ('p1', ''): empty mutant"),
        ("id,mutant\np1\n", "1 field(s), expected at least 2"),
        ("id,mutant\n,M1A\n", "empty id"),
        ("id,mutant\np1,M0A\n", "positions are 1-based"),
        ("id,mutant\np1,M1A:M1C\n", "position 1 appears more than once"),
    ],
)
def test_a_bad_row_stops_the_run_before_compute_and_is_named(tmp_path, wt, tiny_model_dir, text, named):
    out = tmp_path / "o.parquet"
    result = score(tiny_model_dir, wt, "--mutations", csv(tmp_path, text), "-o", out)
    assert result.exit_code == 2, result.output
    assert named in result.stderr and "--skip-invalid" in result.stderr
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty file"),
        ("id,mutant\n", "no mutants (a header and no rows)"),
        ("p1,M1A\n", "the first line must be a header with columns id,mutant"),
        (">p1\nMKV\n", "the first line must be a header"),
    ],
)
def test_unusable_mutant_files_exit_2(tmp_path, wt, tiny_model_dir, text, why):
    result = score(tiny_model_dir, wt, "--mutations", csv(tmp_path, text), "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2 and why in result.stderr, result.output


def test_skip_invalid_scores_the_rest_and_says_how_many(tmp_path, wt, tiny_model_dir):
    text = "id,mutant\np1,M1A\np9,G1W\np1,A40G\np2,G1W\n"
    out = tmp_path / "o.parquet"
    result = score(tiny_model_dir, wt, "--mutations", csv(tmp_path, text), "-o", out, "--skip-invalid")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table["mutant"].to_pylist() == ["M1A", "G1W"] and table["id"].to_pylist() == ["p1", "p2"]
    assert "skipping 2 mutant(s)" in result.stderr and "2 mutants skipped" in result.stderr


def test_every_row_bad_is_an_error_even_when_skipping(tmp_path, wt, tiny_model_dir):
    text = "id,mutant\np9,M1A\n"
    result = score(tiny_model_dir, wt, "--mutations", csv(tmp_path, text), "-o", tmp_path / "o", "--skip-invalid")
    assert result.exit_code == 2 and "no mutant can be scored" in result.stderr


def test_rows_of_an_invalid_record_are_named_as_such(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "wt.fa", [("good", "MKV"), ("bad", "MKJV")])
    text = "id,mutant\ngood,M1A\nbad,M1A\n"
    out = tmp_path / "o.parquet"
    result = score(tiny_model_dir, fa, "--mutations", csv(tmp_path, text), "-o", out)
    assert result.exit_code == 2 and "record #2 'bad'" in result.stderr
    result = score(tiny_model_dir, fa, "--mutations", csv(tmp_path, text), "-o", out, "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "its FASTA record is invalid and was skipped" in result.stderr
    assert pq.read_table(out)["id"].to_pylist() == ["good"]


def test_one_protein_needs_no_id_column(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "wt.fa", WT[:1])
    out = tmp_path / "o.parquet"
    result = score(tiny_model_dir, fa, "--mutations", csv(tmp_path, "mutant\nM1A\nK2G:T3A\n"), "-o", out)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out)["id"].to_pylist() == ["p1", "p1"]


@pytest.mark.parametrize(
    "args, why",
    [
        ([], "give exactly one of --pll, --mutations CSV, --all-substitutions"),
        (["--pll", "--all-substitutions"], "give exactly one of"),
        (["--pll", "--method", "wt-marginal"], "a pseudo-log-likelihood always masks"),
        (["--all-substitutions", "--method", "nope"], "'nope' is not one of"),
        (["--pll", "--truncate", "0"], "0 is not in the range x>=1"),
    ],
)
def test_option_mistakes_exit_2(tmp_path, wt, tiny_model_dir, args, why):
    result = score(tiny_model_dir, wt, *args, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2 and why in result.stderr, result.output


def test_fasta_problems_exit_2(tmp_path, tiny_model_dir):
    out = tmp_path / "o.parquet"
    (tmp_path / "empty.fa").write_text("")
    for fasta, why in [
        (tmp_path / "nope.fa", "no such file"),
        (tmp_path / "empty.fa", "no records to score"),
        (write_fasta(tmp_path / "dup.fa", [("a", "MKV"), ("a", "MKA")]), "id 'a' occurs more than once"),
    ]:
        result = score(tiny_model_dir, fasta, "--mutations", csv(tmp_path, "id,mutant\na,M1A\n"), "-o", out)
        assert result.exit_code == 2 and why in result.stderr, result.output


def test_an_existing_output_is_refused_then_replaced_only_when_complete(tmp_path, wt, tiny_model_dir, monkeypatch):
    out = tmp_path / "o.parquet"
    out.write_bytes(b"precious")
    result = score(tiny_model_dir, wt, "--pll", "-o", out)
    assert result.exit_code == 2 and "already exists and is not esm2cli output (add --overwrite" in result.stderr
    directory = tmp_path / "adir"
    directory.mkdir()
    result = score(tiny_model_dir, wt, "--pll", "-o", directory, "--overwrite")
    assert result.exit_code == 2 and "is a directory" in result.stderr
    result = score(tiny_model_dir, wt, "--pll", "-o", wt, "--overwrite")
    assert result.exit_code == 2 and "is the FASTA: name another output" in result.stderr
    muts = csv(tmp_path, "id,mutant\np1,M1A\n")
    result = score(tiny_model_dir, wt, "--mutations", muts, "-o", muts, "--overwrite")
    assert result.exit_code == 2 and "is the mutant list" in result.stderr
    os.remove(muts)

    from esm2cli.runtime.replica import Replica

    def fail(self, items):
        raise RuntimeError("the device fell over")

    with monkeypatch.context() as patch:
        patch.setattr(Replica, "lm_log_probs", fail)
        result = score(tiny_model_dir, wt, "--pll", "-o", out, "--overwrite")
    assert result.exit_code == 1 and "the device fell over" in result.stderr
    assert out.read_bytes() == b"precious"  # never deleted before a complete replacement
    assert sorted(os.listdir(tmp_path)) == ["adir", "o.parquet", "wt.fa"]  # no temporary left behind

    result = score(tiny_model_dir, wt, "--pll", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows == 2
    meta = json.loads(table.schema.metadata[b"esm2cli"])
    assert meta["mode"] == "pll" and meta["window"] == 1022 and meta["random_weights"] is False


def test_fasta_from_stdin(tmp_path, tiny_model_dir):
    out = tmp_path / "o.parquet"
    result = score(tiny_model_dir, "-", "--pll", "-o", out, input=">a\nMKV\n>b\nGSHM\n")
    assert result.exit_code == 0, result.output
    assert pq.read_table(out)["length"].to_pylist() == [3, 4]


def test_a_long_mutant_list_costs_one_pass_per_position(tmp_path, wt, tiny_model_dir):
    seq = dict(WT)["p1"]
    aa = "ACDEFGHIKLMNPQRSTVWY"
    rows = [f"p1,{seq[i]}{i + 1}{aa[(i + k) % 20]}:{seq[0]}1{aa[k % 20]}" for k in range(1000) for i in (4, 9)]
    path = csv(tmp_path, "id,mutant\n" + "\n".join(rows) + "\n")
    out = tmp_path / "o.parquet"
    result = score(tiny_model_dir, wt, "--mutations", path, "-o", out)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == 2000
    assert "3 distinct inputs for 3 positions" in result.stderr


@pytest.mark.slow
def test_sigterm_leaves_the_earlier_output_and_no_temporary(tmp_path, reap):
    from esm2cli.jobs.workload import synthetic_sequences

    fasta = write_fasta(tmp_path / "in.fa", list(synthetic_sequences(20, seed=5, max_length=300)))
    out = tmp_path / "o.parquet"
    out.write_bytes(b"earlier")
    cmd = [sys.executable, "-m", "esm2cli", "score", fasta, "--pll", "-o", str(out), "--overwrite", "-q",
           "-m", "esm2_t6_8M", "--load-format", "dummy", "--dtype", "float32", "--devices", "cpu"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    reap(proc)
    deadline = time.time() + 180
    while not list(tmp_path.glob(".o.parquet.*.tmp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    (tmp,) = tmp_path.glob(".o.parquet.*.tmp")  # the run's own temporary file
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: the output was not written")
    assert out.read_bytes() == b"earlier" and not tmp.exists()


def test_an_unchanged_rerun_is_already_complete_and_a_changed_one_is_not(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "GSHMKVLAAGIV")])
    out = tmp_path / "pll.parquet"
    args = ["score", fasta, "--pll", "-o", str(out), "-m", tiny_model_dir, "--dtype", "float32"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    before = out.read_bytes()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "already complete" in again.output
    assert out.read_bytes() == before  # left as it was
    write_fasta(tmp_path / "in.fa", [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "GSHMKVLAAGIW")])  # one residue
    changed = CliRunner().invoke(cli, args)
    assert changed.exit_code == 2
    assert "already exists, made by another run (the input's content changed)" in changed.output
    other = CliRunner().invoke(cli, [*args[:-2], "--dtype", "bfloat16", "--overwrite"])
    assert other.exit_code == 0 and "already complete" not in other.output


def test_an_output_stdin_is_redirected_from_is_refused(tmp_path):
    fasta = write_fasta(tmp_path / "in.fa", WT[:1])
    cmd = [sys.executable, "-m", "esm2cli", "score", "-", "--pll", "-o", fasta, "--overwrite", "--load-format", "dummy"]
    with open(fasta, "rb") as stdin:
        done = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True)
    assert done.returncode == 2 and f"{fasta} is the FASTA: name another output" in done.stderr, done.stderr
    assert open(fasta).read().startswith(">p1")


def assert_same_rows(path, reference):
    got, want = pq.read_table(path), pq.read_table(reference)
    assert got.num_rows == want.num_rows > 0
    assert got.to_pylist() == want.to_pylist()


@pytest.mark.parametrize("mode", ["--pll", "--all-substitutions"])
def test_a_fasta_through_a_process_substitution_scores_as_the_file(tmp_path, wt, tiny_model_dir, mode):
    assert score(tiny_model_dir, wt, mode, "-o", tmp_path / "file.parquet").exit_code == 0
    done = run_esm2cli("score", "@FASTA@", mode, "-o", tmp_path / "pipe.parquet", "-m", tiny_model_dir,
                       "--dtype", "float32", piped={"@FASTA@": wt})  # fmt: skip
    assert done.returncode == 0, done.stderr  # the proteins were read a second time from the empty pipe: no row
    assert_same_rows(tmp_path / "pipe.parquet", tmp_path / "file.parquet")


def test_a_mutant_list_from_a_fifo_is_read_once_and_known_by_its_content(tmp_path, wt, tiny_model_dir):
    first, other = "id,mutant\np1,M1A\np2,G1W\n", "id,mutant\np1,K2A\n"
    reference = tmp_path / "file.parquet"
    assert score(tiny_model_dir, wt, "--mutations", csv(tmp_path, first), "-o", reference).exit_code == 0
    fed_fifo(tmp_path / "m.fifo", first.encode())
    out = tmp_path / "o.parquet"
    done = run_esm2cli("score", wt, "--mutations", tmp_path / "m.fifo", "-o", out, "-m", tiny_model_dir,
                       "--dtype", "float32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_rows(out, tmp_path / "file.parquet")
    # Another list through a pipe is another run (it was hashed from the emptied pipe: "already complete").
    again = run_esm2cli("score", wt, "--mutations", "@CSV@", "-o", out, "-m", tiny_model_dir, "--dtype", "float32",
                        piped={"@CSV@": csv(tmp_path, other, "other.csv")})  # fmt: skip
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr
    assert_same_rows(out, tmp_path / "file.parquet")


def test_a_mutant_list_on_stdin(tmp_path, wt, tiny_model_dir):
    text = "id,mutant\np1,M1A\np2,G1W\n"
    assert score(tiny_model_dir, wt, "--mutations", csv(tmp_path, text), "-o", tmp_path / "file.parquet").exit_code == 0
    result = score(tiny_model_dir, wt, "--mutations", "-", "-o", tmp_path / "o.parquet", input=text)
    assert result.exit_code == 0, result.output  # it said '-: no such file'
    assert_same_rows(tmp_path / "o.parquet", tmp_path / "file.parquet")
    bad = score(tiny_model_dir, wt, "--mutations", "-", "-o", tmp_path / "bad.parquet", input="id,mutant\np1,A40G\n")
    assert bad.exit_code == 2 and "Error: -: 1 of 1 mutants cannot be scored" in bad.output  # named as given
    both = score(tiny_model_dir, "-", "--mutations", "-", "-o", tmp_path / "both.parquet", input=">p1\nMKV\n")
    assert both.exit_code == 2 and "the FASTA is already read from stdin; name a file for the list" in both.output


def test_one_stream_for_the_fasta_and_the_mutant_list_is_refused_at_once(tmp_path, wt, tiny_model_dir):
    # The FASTA's copy drained the stream: the list's read waited on the FIFO for ever, or found stdin empty.
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    done = run_esm2cli("score", fifo, "--mutations", fifo, "-o", tmp_path / "o.parquet", "-m", tiny_model_dir,
                       timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"Error: --mutations {fifo}: the FASTA is read from that stream; name a file for the list" in done.stderr
    for fasta, mutations in [("/dev/stdin", "-"), ("-", "/dev/stdin")]:
        piped = run_esm2cli("score", fasta, "--mutations", mutations, "-o", tmp_path / "o.parquet",
                            "-m", tiny_model_dir, input=">p1\nMKV\n", timeout=60)  # fmt: skip
        assert piped.returncode == 2, piped.stderr
        assert f"--mutations {mutations}: the FASTA is read from that stream" in piped.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_an_output_that_is_a_fifo_is_refused_not_waited_on(tmp_path, wt, tiny_model_dir):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    done = run_esm2cli("score", wt, "--pll", "-o", fifo, "-m", tiny_model_dir, timeout=60)
    assert done.returncode == 2 and f"Error: {fifo} is not a regular file" in done.stderr, done.stderr
