from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.config import EmbedConfig
from esm2cli.io.parquet import read_metadata
from helpers import embed_cli, fed_fifo, random_protein, run_esm2cli, write_fasta
from reference import DirectReference, cosine, torch_state


@pytest.fixture
def fasta(tmp_path, proteins):
    return write_fasta(tmp_path / "in.fa", proteins)


def run(*args, input=None):
    args = [*map(str, args)]
    if "--dtype" not in args:
        args += ["--dtype", "float32"]  # compared with float32 references at tight tolerances
    return CliRunner().invoke(cli, ["embed", *args], input=input)


def embed_ok(*args, input=None):
    result = run(*args, input=input)
    assert result.exit_code == 0, result.output
    return result


def vectors(table, column="embedding"):
    return np.array(table[column].to_pylist(), dtype=np.float32)


def test_embed_matches_each_sequence_computed_alone(tmp_path, fasta, proteins, tiny_model_dir, direct):
    out = tmp_path / "out.parquet"
    result = embed_ok(fasta, "-o", out, "-m", tiny_model_dir, "--max-tokens", "2048")
    table = pq.read_table(out)
    assert table["id"].to_pylist() == [rec_id for rec_id, _ in proteins]
    assert table["length"].to_pylist() == [len(s) for _, s in proteins]
    assert table["truncated"].to_pylist() == [len(s) > 1022 for _, s in proteins]
    assert any(table["truncated"].to_pylist())
    want = np.stack([direct.mean(seq[:1022]) for _, seq in proteins])
    got = vectors(table)
    assert cosine(got, want).min() >= 0.9999
    # Both sides are float32 with errors near 1e-6 (1% of this tolerance). This failed once, in a full run
    # (58 of 1,280 values, max 6.0e-5), and never since: a failure says which side moved, against float64.
    try:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_which_side_moved(got, want, proteins, tiny_model_dir)}") from None
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert "embedded 40 sequences" in result.stderr and "truncated" in result.stderr


def _which_side_moved(got, want, proteins, model_dir) -> str:
    """The proteins beyond the tolerance, each side's error against a float64 forward, and torch's state."""
    exact = DirectReference(model_dir, torch.float64)
    beyond = np.abs(got - want) > 1e-5 + 1e-4 * np.abs(want)
    lines = [torch_state()]
    for row in sorted(set(np.nonzero(beyond)[0].tolist())):
        rec_id, seq = proteins[row]
        truth = exact.mean(seq[:1022])
        lines.append(
            f"{rec_id} ({len(seq)} residues): {beyond[row].sum()} values beyond; max |esm2cli - float64| "
            f"{np.abs(got[row] - truth).max():.2e}, max |reference - float64| {np.abs(want[row] - truth).max():.2e}"
        )
    return "\n".join(lines)


def test_four_simulated_devices_give_the_same_rows(tmp_path, fasta, tiny_model_dir):
    one, four = tmp_path / "one.parquet", tmp_path / "four.parquet"
    embed_ok(fasta, "-o", one, "-m", tiny_model_dir, "--devices", "cpu", "--batch-size", "4")
    result = embed_ok(fasta, "-o", four, "-m", tiny_model_dir, "--devices", "sim:4", "--batch-size", "4")
    a, b = pq.read_table(one), pq.read_table(four)
    assert a["id"].to_pylist() == b["id"].to_pylist()
    np.testing.assert_allclose(vectors(a), vectors(b), rtol=1e-5, atol=1e-6)
    assert "sim:0, sim:1, sim:2, sim:3" in result.stderr


def test_several_layers_bos_and_per_token(tmp_path, tiny_model_dir, direct):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKVLAW"), ("b", "GG"), ("c", "ACDEFGHIKLMNPQRSTVWY")])
    out = tmp_path / "out.parquet"
    embed_ok(fa, "-o", out, "-m", tiny_model_dir, "--layers", "0,-2", "--pooling", "bos", "--per-token")
    table = pq.read_table(out)
    assert table.column_names == [
        "id",
        "description",
        "length",
        "truncated",
        "windows",
        "sequence_sha256",
        "embedding_l0",
        "embedding_l2",
        "per_token_l0",
        "per_token_l2",
    ]
    seqs = ["MKVLAW", "GG", "ACDEFGHIKLMNPQRSTVWY"]
    for layer in (0, 2):
        np.testing.assert_allclose(
            vectors(table, f"embedding_l{layer}"), np.stack([direct.bos(s, layer) for s in seqs]), rtol=1e-4, atol=1e-5
        )
        for seq, tokens in zip(seqs, table[f"per_token_l{layer}"].to_pylist(), strict=True):
            np.testing.assert_allclose(np.array(tokens), direct.per_token(seq, layer), rtol=1e-4, atol=1e-5)
    meta = read_metadata(out)
    assert meta["layers"] == [0, 2] and meta["pooling"] == "bos" and meta["dtype"] == "float32"
    assert meta["model"] == tiny_model_dir and meta["random_weights"] is False and meta["esm2cli_version"]


def test_gzip_and_stdin(tmp_path, tiny_model_dir):
    text = ">x desc one\nMKV\n>y\nLLAW\n"
    gz = tmp_path / "in.fa.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    embed_ok(gz, "-o", tmp_path / "gz.parquet", "-m", tiny_model_dir)
    embed_ok("-", "-o", tmp_path / "stdin.parquet", "-m", tiny_model_dir, input=text)
    a, b = pq.read_table(tmp_path / "gz.parquet"), pq.read_table(tmp_path / "stdin.parquet")
    assert a["id"].to_pylist() == b["id"].to_pylist() == ["x", "y"]
    assert a["description"].to_pylist() == ["desc one", ""]
    np.testing.assert_array_equal(vectors(a), vectors(b))


HOSTILE = {
    "invalid residues": (">ok\nMKV\n>bad1\nMKJV\n>bad2\nMK1\n", ["bad1", "'J'", "bad2", "'1'", "2 of 3 records"]),
    "empty sequence": (">ok\nMKV\n>empty\n\n", ["'empty': empty sequence"]),
    "no id": (">ok\nMKV\n>\nMKV\n", ["record #2 (no id)"]),
    "gap characters": (">ok\nMKV\n>aligned\nMK--V\n", ["aligned", "'-'"]),
    "duplicates": (">a\nMKV\n>b\nMK\n>a\nLL\n", ["duplicate id 'a' (2 records)", "--allow-duplicate-ids"]),
    "not fasta": ("id,seq\na,MKV\n", ["line 1 is not a FASTA header"]),
    "empty file": ("", ["no records to embed"]),
    "every record invalid": (">a\n123\n", ["1 of 1 records cannot be embedded"]),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_fasta_stops_before_compute_with_a_clear_message(tmp_path, tiny_model_dir, case):
    text, expected = HOSTILE[case]
    fa = tmp_path / "in.fa"
    fa.write_text(text)
    out = tmp_path / "out.parquet"
    result = run(fa, "-o", out, "-m", str(tmp_path / "no-model-needed"))
    assert result.exit_code == 2, result.output
    for part in expected:
        assert part in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.parquet*.tmp"))


def test_every_problem_of_the_input_is_reported_in_one_pass_and_bounded(tmp_path, tiny_model_dir):
    fa = tmp_path / "in.fa"
    fa.write_text(">a\nMKV\n>bad\nMKJV\n>a\nLLW\n")
    result = run(fa, "-o", tmp_path / "out.parquet", "-m", str(tmp_path / "no-model-needed"))
    assert result.exit_code == 2, result.output
    for part in ("2 problems", "1 of 3 records cannot be embedded", "'bad'", "duplicate id 'a' (2 records)"):
        assert part in result.output, part
    many = "".join(f">bad{i}\nMK1V\n>dup{i}\nMKV\n>dup{i}\nMKV\n" for i in range(30))
    fa.write_text(many)
    result = run(fa, "-o", tmp_path / "out.parquet", "-m", str(tmp_path / "no-model-needed"))
    assert result.exit_code == 2, result.output
    assert "... and 10 more invalid records" in result.output and "... and 10 more duplicate ids" in result.output
    assert len(result.output.splitlines()) < 50


def test_binary_file(tmp_path, tiny_model_dir):
    fa = tmp_path / "in.fa"
    fa.write_bytes(b">a\nMK\x00\xff\xfe\n")
    result = run(fa, "-o", tmp_path / "o.parquet", "-m", tiny_model_dir)
    assert result.exit_code == 2 and "not UTF-8" in result.output


def test_skip_invalid_embeds_the_rest_and_reports(tmp_path, tiny_model_dir):
    fa = tmp_path / "in.fa"
    fa.write_text(">a\nMKV\n>bad\nMKJV\n>b\nLLW\n>\nMK\n")
    out = tmp_path / "out.parquet"
    result = embed_ok(fa, "-o", out, "-m", tiny_model_dir, "--skip-invalid")
    assert pq.read_table(out)["id"].to_pylist() == ["a", "b"]
    assert "skipping 2 invalid record(s)" in result.stderr and "'bad'" in result.stderr
    assert "2 skipped" in result.stderr


def test_allow_duplicate_ids_keeps_every_row(tmp_path, tiny_model_dir):
    fa = tmp_path / "in.fa"
    fa.write_text(">a\nMKV\n>a\nLLW\n")
    out = tmp_path / "out.parquet"
    embed_ok(fa, "-o", out, "-m", tiny_model_dir, "--allow-duplicate-ids")
    table = pq.read_table(out)
    assert table["id"].to_pylist() == ["a", "a"]
    assert not np.allclose(*vectors(table))


def test_existing_output_needs_overwrite(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKV")])
    out = tmp_path / "out.parquet"
    out.write_text("precious")
    result = run(fa, "-o", out, "-m", tiny_model_dir)
    assert result.exit_code == 2 and "already exists" in result.output
    assert out.read_text() == "precious"
    embed_ok(fa, "-o", out, "-m", tiny_model_dir, "--overwrite")
    assert pq.read_table(out).num_rows == 1


@pytest.mark.parametrize(
    "name, message",
    [
        ("out.csv", "embed writes Parquet (.parquet, .pq) or HDF5 (.h5, .hdf5), not .csv"),
        ("out.NPY", "not .npy"),
        ("-", "-o -: embed writes a file (Parquet or HDF5), not a stream to stdout"),
    ],
)
def test_an_output_name_of_another_format_or_stdout_is_refused(tmp_path, tiny_model_dir, name, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKV")])
    result = run(fa, "-o", name, "-m", tiny_model_dir)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fa"]  # nothing written, no file named '-'


def test_output_names_of_the_written_formats_and_without_extension_are_parquet(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKV")])
    for name in ("out.pq", "run.d/out"):
        (tmp_path / "run.d").mkdir(exist_ok=True)
        embed_ok(fa, "-o", tmp_path / name, "-m", tiny_model_dir, "-q")
        assert pq.read_table(tmp_path / name).num_rows == 1


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["-m", "/nonexistent/model"], 1, "no such model directory"),
        (["-m", "esm2_t6_8M"], 1, "facebook/esm2_t6_8M_UR50D is not in the Hugging Face cache"),
        (["--devices", "cuda:3"], 2, "asked for cuda:3"),
        (["--layers", "x"], 2, "not a comma-separated list"),
        (["--layers", "9"], 2, "layer 9 is out of range"),
    ],
)
def test_bad_options_and_models_end_in_one_clear_line(tmp_path, tiny_model_dir, args, code, message):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKV")])
    full = ["-m", tiny_model_dir, *args]
    result = run(fa, "-o", tmp_path / "out.parquet", *full)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_failing_batch_fails_the_run_and_leaves_no_file(tmp_path, tiny_model_dir, monkeypatch, proteins):
    from esm2cli.runtime.replica import Replica

    original, calls = Replica.embed_batch, []

    def flaky(self, seqs):
        calls.append(len(seqs))
        if len(calls) == 3:
            raise RuntimeError("device fell over")
        return original(self, seqs)

    monkeypatch.setattr(Replica, "embed_batch", flaky)
    fa = write_fasta(tmp_path / "in.fa", proteins)
    out = tmp_path / "out.parquet"
    result = run(fa, "-o", out, "-m", tiny_model_dir, "--batch-size", "2", "--devices", "sim:2")
    assert result.exit_code == 1
    assert "a batch failed on sim:" in result.output and "device fell over" in result.output
    assert not out.exists() and not list(tmp_path.rglob(".*.tmp"))


def test_pandas_duckdb_and_polars_read_the_output(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKV"), ("b", "LLAW")])
    out = tmp_path / "out.parquet"
    embed_ok(fa, "-o", out, "-m", tiny_model_dir)
    import duckdb
    import pandas as pd
    import polars as pl

    want = vectors(pq.read_table(out))
    frame = pd.read_parquet(out)
    assert frame["id"].tolist() == ["a", "b"]
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()), want)
    rows = duckdb.sql(f"SELECT id, embedding FROM '{out}' ORDER BY id").fetchall()
    np.testing.assert_allclose(np.array([r[1] for r in rows], dtype=np.float32), want)
    polars_frame = pl.read_parquet(out)
    np.testing.assert_array_equal(polars_frame["embedding"].to_numpy(), want)


def test_real_subprocess_with_stdin(tmp_path, tiny_model_dir):
    out = tmp_path / "out.parquet"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESM2CLI_")}
    proc = subprocess.run(
        [sys.executable, "-m", "esm2cli", "embed", "-", "-o", str(out), "-m", tiny_model_dir, "--devices", "sim:2"]
        + ["--dtype", "float32"],
        input=">p1 first\nMKVLA\n>p2\nmkv*\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # stdout is for data; logs and the summary go to stderr
    assert "embedded 2 sequences" in proc.stderr
    table = pq.read_table(out)
    assert table["id"].to_pylist() == ["p1", "p2"] and table["length"].to_pylist() == [5, 3]


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from esm2cli.cli import cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False"


def test_the_summary_line_and_the_metadata_name_the_model_and_the_resolved_dtype(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKV"), ("b", "GSHM")])
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(cli, ["embed", fa, "-o", str(out), "-m", tiny_model_dir, "--dtype", "auto"])
    assert result.exit_code == 0, result.output
    dtype = read_metadata(out)["dtype"]
    assert dtype in ("float32", "bfloat16", "float16")  # resolved, never "auto"
    assert f"with {tiny_model_dir} in {dtype} on " in result.stderr.splitlines()[-1]
    forced = embed_ok(fa, "-o", tmp_path / "f32.parquet", "-m", tiny_model_dir, "--dtype", "float32")
    assert f"with {tiny_model_dir} in float32 on " in forced.stderr.splitlines()[-1]
    assert read_metadata(tmp_path / "f32.parquet")["dtype"] == "float32"


def test_the_progress_bar_counts_residues_so_its_eta_holds(tmp_path, tiny_model_dir):
    from esm2cli.config import BatchConfig, InputConfig, ModelConfig
    from esm2cli.jobs.pipeline import embed_fasta

    seen = []

    def factory(total, residues=None):
        seen.append((total, residues))
        return lambda rows, res: seen.append((rows, res))

    fa = write_fasta(tmp_path / "in.fa", [("a", "M" * 50), ("b", "K" * 30), ("c", "MKV" * 500)])
    embed_fasta(fa, str(tmp_path / "o.parquet"), model=ModelConfig(model=tiny_model_dir, dtype="float32"),
                embed=EmbedConfig(), batch=BatchConfig(), inputs=InputConfig(), progress_factory=factory)  # fmt: skip
    (total, residues), *updates = seen
    assert total == 3 and residues == 50 + 30 + 1022  # residues as computed: the long one truncated
    assert sum(r for _, r in updates) == residues and sum(n for n, _ in updates) == 3


def test_truncate_over_the_model_positions_embeds_or_is_refused_up_front(tiny_model_dir, tmp_path):
    seq = random_protein(1500)
    fasta = tmp_path / "long.fa"
    fasta.write_text(f">long\n{seq}\n")
    out = tmp_path / "out.parquet"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "esm2cli", "embed", str(fasta), "-o", str(out), "-m", tiny_model_dir]
    args += ["--devices", "cpu", "--dtype", "float32", "--truncate", "2000", "-q"]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    # Rotary ESM-2 embeds it whole, as transformers' EsmModel does (the rotary table grows past 1,026).
    assert run.returncode == 0, run.stderr
    table = pq.read_table(out).to_pydict()
    assert table["length"] == [1500] and table["truncated"] == [False]
    want = DirectReference(tiny_model_dir).mean(seq)
    np.testing.assert_allclose(np.asarray(table["embedding"][0]), want, atol=1e-4)


STREAMED = [("p1", "MKTAYIAK"), ("p2", "GGSS"), ("p3", "MKVLAAGIVGLLLAWQ")]
ON_CPU = ["--devices", "cpu", "--dtype", "float32"]


@pytest.fixture
def streamed(tmp_path, tiny_model_dir):
    """A FASTA to stream, and the embeddings of the file itself."""
    fa = write_fasta(tmp_path / "in.fa", STREAMED)
    embed_ok(fa, "-o", tmp_path / "file.parquet", "-m", tiny_model_dir, *ON_CPU)
    return fa, tmp_path / "file.parquet"


def assert_same_embeddings(path, reference):
    got, want = pq.read_table(path), pq.read_table(reference)
    assert got["id"].to_pylist() == want["id"].to_pylist() == [rec_id for rec_id, _ in STREAMED]
    np.testing.assert_array_equal(vectors(got), vectors(want))


def test_a_process_substitution_is_read_once_like_stdin(tmp_path, tiny_model_dir, streamed):
    fa, reference = streamed  # '<(cat in.fa)' is /dev/fd/63, a pipe: a second open finds it empty
    done = run_esm2cli("embed", "@FASTA@", "-o", tmp_path / "o.parquet", "-m", tiny_model_dir, *ON_CPU,
                       piped={"@FASTA@": fa})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_embeddings(tmp_path / "o.parquet", reference)


def test_shards_of_a_process_substitution_merge_into_the_file_s_embeddings(tmp_path, tiny_model_dir, streamed):
    fa, reference = streamed
    parts = tmp_path / "parts"
    for index in (0, 1, 0):  # shard 0 twice: the same bytes piped again are the same input, by their content
        done = run_esm2cli("embed", "@FASTA@", "-o", parts, "--shard-count", "2", "--shard-index", index,
                           "-m", tiny_model_dir, *ON_CPU, piped={"@FASTA@": fa})  # fmt: skip
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr  # it seeked on the pipe
    assert "part-00000-of-00002.parquet is already complete" in done.stderr
    merged = CliRunner().invoke(cli, ["merge", str(parts), "-o", str(tmp_path / "merged.parquet")])
    assert merged.exit_code == 0, merged.output
    assert_same_embeddings(tmp_path / "merged.parquet", reference)


@pytest.mark.parametrize("how", ["named FIFO", "/dev/stdin"])
def test_a_fifo_or_dev_stdin_is_read_once(tmp_path, tiny_model_dir, streamed, how):
    fa, reference = streamed
    text = Path(fa).read_text()
    if how == "named FIFO":  # opened to sniff, then again: the second open waited forever for a writer
        fed_fifo(tmp_path / "in.fifo", text.encode())
        done = run_esm2cli("embed", tmp_path / "in.fifo", "-o", tmp_path / "o.parquet", "-m", tiny_model_dir, *ON_CPU)
    else:
        done = run_esm2cli("embed", "/dev/stdin", "-o", tmp_path / "o.parquet", "-m", tiny_model_dir, *ON_CPU,
                           input=text)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_embeddings(tmp_path / "o.parquet", reference)


def test_reuse_of_a_stream_is_refused_in_one_line_without_opening_it(tmp_path, tiny_model_dir, streamed):
    fa, _ = streamed
    os.mkfifo(tmp_path / "earlier.parquet")  # no writer: an open would wait forever
    done = run_esm2cli("embed", fa, "-o", tmp_path / "o.parquet", "--reuse", tmp_path / "earlier.parquet",
                       "-m", tiny_model_dir, *ON_CPU, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: --reuse {tmp_path / 'earlier.parquet'}: a stream (a pipe or FIFO), not a file; an earlier output "
        "is read by seeking (Parquet's footer, HDF5's index): write it to a file first"
    )
    assert not (tmp_path / "o.parquet").exists()


def test_an_output_that_is_a_fifo_or_stdout_is_refused_and_left_as_it_is(tmp_path, fasta, tiny_model_dir):
    # A FIFO: the check of an earlier output waited for a writer for ever. A link to /proc/self/fd/1 (what
    # /dev/stdout is): a traceback, and with --overwrite the link itself was replaced by the Parquet file.
    fifo, link = tmp_path / "out.fifo", tmp_path / "stdout.parquet"
    os.mkfifo(fifo)
    os.symlink("/proc/self/fd/1", link)
    for target, extra in [(fifo, ()), (link, ()), (link, ("--overwrite",))]:
        done = run_esm2cli("embed", fasta, "-o", target, "-m", tiny_model_dir, "--dtype", "float32", *extra,
                           timeout=60)  # fmt: skip
        assert done.returncode == 2 and f"Error: {target} is not a regular file" in done.stderr, done.stderr
    assert os.path.islink(link) and os.readlink(link) == "/proc/self/fd/1"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_bad_record_of_a_shard_is_numbered_as_the_shard_counts(tmp_path, tiny_model_dir):
    # Record #13 of the file was named "record #4" with nothing to say the count began at the shard's first.
    records = [(f"r{i}", random_protein(20 + i)) for i in range(12)] + [("x", "MKV1L")]
    fasta = write_fasta(tmp_path / "in.fa", records)
    done = run(fasta, "-o", tmp_path / "parts", "-m", tiny_model_dir, "--shard-count", 2, "--shard-index", 1)
    assert done.exit_code == 2, done.output
    first = next(line for line in done.output.splitlines() if line.startswith("Error:"))
    assert first.startswith(f"Error: {fasta}, shard 1 of 2 (bytes ") and "records counted from its first)" in first
    in_shard = int(re.search(r"1 of (\d+) records cannot be embedded", done.output).group(1))
    assert in_shard < len(records) and f"record #{in_shard} 'x'" in done.output  # 'x' is the shard's last


def test_format_is_checked_against_the_file_a_link_names(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", [("a", "MKV")])
    real, link = tmp_path / "data" / "y.h5", tmp_path / "y.parquet"
    real.parent.mkdir()
    os.symlink(real, link)
    result = embed_cli(fasta, link, tiny_model_dir, "--format", "parquet")
    # before: the name checked was the link's, the format written the target's: HDF5 under --format parquet
    assert result.exit_code == 2, result.output
    assert "--format" in result.output and "y.h5 is not a .parquet file name" in result.output
    assert not real.exists()
    assert embed_cli(fasta, link, tiny_model_dir, "--format", "h5").exit_code == 0
    assert real.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
