"""Runs you can trust: no stale rows on reruns, --overwrite that replaces, strict input, faults in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig
from esm2cli.errors import Interrupted
from esm2cli.io.parquet import read_metadata
from helpers import write_fasta
from reference import cosine

SEQS = [
    ("a", "MKTAYIAKQRQISFVKSHFSRQ"),
    ("b", "MKVLAAGIVGLLLAGGCSSSKE"),
    ("c", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"),
    ("d", "MALWMRLLPLLALLALWGPDPAAA"),
    ("e", "MGSSHHHHHHSSGLVPRGSH"),
    ("f", "MDSKGSSQKGSRLLLLLVVSNLLLCQGVVS"),
]


def embed(*args, input=None):
    return CliRunner().invoke(cli, ["embed", *map(str, args), "--dtype", "float32"], input=input)


def vectors(path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    return dict(zip(table["id"].to_pylist(), np.array(table["embedding"].to_pylist(), np.float32), strict=True))


def edited(records, rec_id, position=3, residue="W"):
    """The records with one residue of one protein replaced: same length, same id."""
    out = []
    for rid, seq in records:
        if rid == rec_id:
            seq = seq[:position] + residue + seq[position + 1 :]
        out.append((rid, seq))
    return out


# 1. A run's identity includes its input's content


def test_an_edited_input_is_never_called_complete(tmp_path, tiny_model_dir, direct):
    fa, out = tmp_path / "a.fa", tmp_path / "out.parquet"
    write_fasta(fa, SEQS)
    assert embed(fa, "-o", out, "-m", tiny_model_dir).exit_code == 0
    again = embed(fa, "-o", out, "-m", tiny_model_dir)
    assert again.exit_code == 0 and "already complete" in again.output

    changed = edited(SEQS, "c")
    write_fasta(fa, changed)
    before = out.read_bytes()
    refused = embed(fa, "-o", out, "-m", tiny_model_dir)
    assert refused.exit_code == 2, refused.output
    assert "the input's content changed" in refused.output and "--overwrite" in refused.output
    assert out.read_bytes() == before

    replaced = embed(fa, "-o", out, "-m", tiny_model_dir, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    got = vectors(out)
    assert cosine(got["c"][None], direct.mean(changed[2][1])[None])[0] > 0.99999
    assert cosine(got["c"][None], direct.mean(SEQS[2][1])[None])[0] < 0.9999  # the edit shows
    assert read_metadata(out)["identity"]["input_sha256"] != ""


def test_different_data_on_stdin_is_not_complete(tmp_path, tiny_model_dir):
    out = tmp_path / "out.parquet"
    first = "".join(f">{i}\n{s}\n" for i, s in SEQS)
    assert embed("-", "-o", out, "-m", tiny_model_dir, input=first).exit_code == 0
    assert "already complete" in embed("-", "-o", out, "-m", tiny_model_dir, input=first).output
    second = "".join(f">{i}\n{s}\n" for i, s in edited(SEQS, "a"))
    result = embed("-", "-o", out, "-m", tiny_model_dir, input=second)
    assert result.exit_code == 2 and "the input's content changed" in result.output


def test_options_that_change_the_numbers_are_named(tmp_path, tiny_model_dir):
    fa, out = write_fasta(tmp_path / "a.fa", SEQS), tmp_path / "out.parquet"
    assert embed(fa, "-o", out, "-m", tiny_model_dir).exit_code == 0
    result = embed(fa, "-o", out, "-m", tiny_model_dir, "--pooling", "bos")
    assert result.exit_code == 2 and "pooling was 'mean', now 'bos'" in result.output


def test_other_weights_in_the_same_directory_are_not_complete(tmp_path, tiny_model_dir):
    import shutil

    from helpers import build_tiny_esm2

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    fa, out = write_fasta(tmp_path / "a.fa", SEQS), tmp_path / "out.parquet"
    assert embed(fa, "-o", out, "-m", model).exit_code == 0
    build_tiny_esm2(model, seed=8)  # retrained in place: same path, other weights
    result = embed(fa, "-o", out, "-m", model)
    assert result.exit_code == 2 and "the model's weights changed" in result.output


def _interrupt_after(sequences: int):
    """A progress factory that raises Interrupted (as the SIGINT handler does) once enough rows are back."""

    def factory(total, residues=None):
        seen = [0]

        def update(rows, residues):
            seen[0] += rows
            if seen[0] >= sequences:
                raise Interrupted(signal.SIGINT)

        return update

    return factory


def _embed_fasta(fa, out, model_dir, **kw):
    from esm2cli.jobs.pipeline import embed_fasta

    return embed_fasta(
        str(fa), str(out), model=ModelConfig(model=str(model_dir), dtype="float32", devices="cpu"),
        embed=EmbedConfig(), batch=BatchConfig(chunk_size=2, max_tokens=1024), inputs=InputConfig(), **kw,
    )  # fmt: skip


def test_a_committed_chunk_whose_records_changed_is_recomputed(tmp_path, tiny_model_dir, direct):
    fa, out = tmp_path / "a.fa", tmp_path / "out.parquet"
    write_fasta(fa, SEQS)
    with pytest.raises(Interrupted):
        _embed_fasta(fa, out, tiny_model_dir, progress_factory=_interrupt_after(4))
    work = tmp_path / "_out.parquet.parts"
    assert len(list(work.glob("chunk-*.parquet"))) >= 2 and not out.exists()

    changed = edited(SEQS, "b")  # in the first committed chunk: same path, same length
    write_fasta(fa, changed)
    summary = _embed_fasta(fa, out, tiny_model_dir)
    assert summary.recomputed == 1 and summary.resumed >= 2
    got = vectors(out)
    assert list(got) == [rid for rid, _ in SEQS]
    want = np.stack([direct.mean(seq) for _, seq in changed])
    assert cosine(np.stack(list(got.values())), want).min() > 0.99999
    assert not work.exists()


def test_embeddings_do_not_depend_on_where_chunks_fell(tmp_path, tiny_model_dir, proteins):
    fa = write_fasta(tmp_path / "p.fa", proteins[:24])
    runs = {}
    for size in (1, 5, 4096):
        out = tmp_path / f"c{size}.parquet"
        assert embed(fa, "-o", out, "-m", tiny_model_dir, "--chunk-size", size, "--devices", "cpu").exit_code == 0
        runs[size] = np.stack(list(vectors(out).values()))
    np.testing.assert_allclose(runs[1], runs[4096], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs[5], runs[4096], rtol=1e-5, atol=1e-5)


# 2. --overwrite replaces, it does not delete


def test_output_same_as_input_is_refused_before_anything_is_touched(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fasta", SEQS)
    before = Path(fa).read_bytes()
    os.symlink(fa, tmp_path / "link.fasta")
    for target in (fa, tmp_path / "link.fasta", f"{tmp_path}/./in.fasta"):
        result = embed(fa, "-o", target, "-m", tiny_model_dir, "--overwrite")
        assert result.exit_code == 2 and "is the input file" in result.output
    assert Path(fa).read_bytes() == before


@pytest.mark.parametrize(
    "case", ["headers only", "model that does not load", "interrupted", "invalid records"]
)  # fmt: skip
def test_a_refused_failed_or_interrupted_overwrite_keeps_the_old_output(tmp_path, tiny_model_dir, case):
    fa, out = write_fasta(tmp_path / "a.fa", SEQS), tmp_path / "out.parquet"
    assert embed(fa, "-o", out, "-m", tiny_model_dir).exit_code == 0
    before = out.read_bytes()
    model = tiny_model_dir
    if case == "headers only":
        Path(fa).write_text(">x\n>y\n")
    elif case == "invalid records":
        Path(fa).write_text(">x\nMKTßA\n")
    elif case == "model that does not load":
        model = tmp_path / "no-such-model"
    if case == "interrupted":
        write_fasta(fa, edited(SEQS, "a"))
        with pytest.raises(Interrupted):
            _embed_fasta(fa, out, model, overwrite=True, progress_factory=_interrupt_after(2))
    else:
        result = embed(fa, "-o", out, "-m", model, "--overwrite")
        assert result.exit_code != 0
    assert out.read_bytes() == before


def test_existing_directory_as_output_is_one_line(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "a.fa", SEQS)
    (tmp_path / "outdir").mkdir()
    result = embed(fa, "-o", tmp_path / "outdir", "-m", tiny_model_dir)
    assert result.exit_code == 2 and "is a directory" in result.output and "Traceback" not in result.output


def test_merge_onto_one_of_its_parts_is_refused(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "a.fa", SEQS)
    emb = tmp_path / "emb"
    for i in range(2):
        result = embed(fa, "-o", emb, "-m", tiny_model_dir, "--shard-count", 2, "--shard-index", i)
        assert result.exit_code == 0, result.output
    part = emb / "part-00000-of-00002.parquet"
    before = part.read_bytes()
    result = CliRunner().invoke(cli, ["merge", str(emb), "-o", str(part), "--overwrite"])
    assert result.exit_code == 2 and "is one of the parts being merged" in result.output
    assert part.read_bytes() == before


# 5. Strict input


@pytest.mark.parametrize("letter", ["ß", "ﬁ", "ı", "ſ", "é"])
def test_non_ascii_letters_are_refused_not_upper_cased(tmp_path, tiny_model_dir, letter):
    fa = tmp_path / "a.fa"
    fa.write_text(f">ok\nMKTA\n>bad\nMKT{letter}A\n", encoding="utf-8")
    result = embed(fa, "-o", tmp_path / "o.parquet", "-m", tiny_model_dir)
    assert result.exit_code == 2
    assert f"record #2 'bad': character(s) outside the ESM-2 alphabet: '{letter}'" in result.output


def test_control_characters_in_headers_are_refused_and_a_bom_is_accepted(tmp_path, tiny_model_dir):
    fa = tmp_path / "a.fa"
    fa.write_bytes(b">a\x00b x\nMKTA\n")
    result = embed(fa, "-o", tmp_path / "o.parquet", "-m", tiny_model_dir)
    assert result.exit_code == 2 and "control character (U+0000" in result.output and "\x00" not in result.output
    fa.write_bytes("\ufeff>first desc\tcolumn\nMKTA\n".encode())
    assert embed(fa, "-o", tmp_path / "o.parquet", "-m", tiny_model_dir).exit_code == 0
    table = pq.read_table(tmp_path / "o.parquet")
    assert table["id"].to_pylist() == ["first"] and table["description"].to_pylist() == ["desc\tcolumn"]


# 6. Faults are one line and lose nothing


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _slow_run(fa, out, *extra):
    cmd = [sys.executable, "-m", "esm2cli", "embed", str(fa), "-o", str(out), "-m", "esm2_t6_8M",
           "--load-format", "dummy", "--dtype", "float32", "--chunk-size", "4", "--devices", "cpu", *extra]  # fmt: skip
    return cmd


def _wait_for_lock(path: Path, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and f'"pid": {proc.pid}' in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never named pid {proc.pid}: {proc.poll()}")


def _wait_for_chunks(work: Path, n: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if work.exists() and len(list(work.glob("chunk-*.parquet"))) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} chunks before the run ended: {proc.poll()}")


# Enough work that a run is still going when a second process has started (about 30 s here: the
# dummy weights load in a second, so the compute must outlast another process's imports and scan).
SLOW_RECORDS = 120


@pytest.fixture(scope="module")
def slow_fasta(tmp_path_factory):
    from esm2cli.jobs.workload import synthetic_sequences

    path = tmp_path_factory.mktemp("slow") / "in.fa"
    return write_fasta(path, list(synthetic_sequences(SLOW_RECORDS, seed=5, max_length=400)))


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_exit_130_or_143_with_one_line_and_the_rerun_resumes(tmp_path, slow_fasta, sig, code, reap):
    out = tmp_path / "out.parquet"
    proc = subprocess.Popen(_slow_run(slow_fasta, out, "-q"), env=_env(), stderr=subprocess.PIPE, text=True)
    reap(proc)
    _wait_for_chunks(tmp_path / "_out.parquet.parts", 2, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: rerun the same command to resume"
    assert "Traceback" not in stderr and not out.exists()
    rerun = subprocess.run(_slow_run(slow_fasta, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from an earlier run" in rerun.stderr
    assert pq.read_table(out).num_rows == SLOW_RECORDS


@pytest.mark.slow
def test_a_second_run_on_a_held_output_is_refused_at_once_and_a_dead_holder_does_not_keep_it(tmp_path, slow_fasta,
                                                                                            reap):  # fmt: skip
    out = tmp_path / "out.parquet"
    # The first run reads stdin from a pipe left open: it takes the lock, then waits for its input, so it
    # holds the output however fast the machine computes.
    first = subprocess.Popen(
        _slow_run("-", out, "-q"), env=_env(), stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    reap(first)
    _wait_for_lock(tmp_path / ".out.parquet.lock", first)
    second = subprocess.run(_slow_run(slow_fasta, out), env=_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"is being written by another esm2cli run (pid {first.pid} on" in second.stderr
    assert "RANDOM weights" not in second.stderr  # refused before any model is loaded
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stdin.close()
    third = subprocess.run(_slow_run(slow_fasta, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert pq.read_table(out).num_rows == SLOW_RECORDS


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB filesystem (tmpfs), where the machine lets us mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_leaves_no_temp_files_and_the_rerun_resumes(tmp_path, tiny_model_dir, small_disk):
    from esm2cli.jobs.workload import synthetic_sequences

    fa = write_fasta(tmp_path / "in.fa", list(synthetic_sequences(60, seed=3, max_length=300)))
    out = small_disk / "out.parquet"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 7_200_000)
    args = (fa, "-o", out, "-m", tiny_model_dir, "--per-token", "--chunk-size", "4")
    result = embed(*args)
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert "No space left on device" in line and str(small_disk) in line
    assert "Traceback" not in result.output
    leftovers = [p.name for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    chunks = list((small_disk / "_out.parquet.parts").glob("chunk-*.parquet"))
    committed = sum(pq.read_metadata(c).num_rows for c in chunks)
    assert committed >= 1  # ~0.8 MB free holds several 4-protein chunks before the disk fills
    filler.unlink()
    rerun = embed(*args)
    assert rerun.exit_code == 0, rerun.output
    assert f"{committed} resumed from an earlier run" in rerun.output
    assert pq.read_table(out).num_rows == 60


def test_a_summary_over_many_devices_is_abbreviated(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "a.fa", SEQS)
    result = embed(fa, "-o", tmp_path / "o.parquet", "-m", tiny_model_dir, "--devices", "sim:8")
    assert result.exit_code == 0
    assert "on sim:0, sim:1, ... sim:7 (8 devices)" in result.output


def _shards(tmp_path, fa, model, count=2, *extra):
    emb = tmp_path / "emb"
    for i in range(count):
        result = embed(fa, "-o", emb, "-m", model, "--shard-count", count, "--shard-index", i, *extra)
        assert result.exit_code == 0, result.output
    return emb


def test_merge_refuses_parts_of_different_runs_and_outputs_inside_the_prefix(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "a.fa", SEQS)
    emb = _shards(tmp_path, fa, tiny_model_dir)
    bos = tmp_path / "bos"
    embed(fa, "-o", bos, "-m", tiny_model_dir, "--shard-count", 2, "--shard-index", 1, "--pooling", "bos")
    (emb / "part-00001-of-00002.parquet").write_bytes((bos / "part-00001-of-00002.parquet").read_bytes())
    result = CliRunner().invoke(cli, ["merge", str(emb), "-o", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2 and "was made by another run" in result.output and "pooling" in result.output
    assert not (tmp_path / "m.parquet").exists()
    for inside in (emb / "new.parquet", emb / "sub" / "x.parquet"):
        result = CliRunner().invoke(cli, ["merge", str(emb), "-o", str(inside)])
        assert result.exit_code == 2 and "lies inside" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(cli, ["merge", str(empty), "-o", str(tmp_path / "x.parquet")]).exit_code == 2


def test_merge_joins_small_row_groups_and_a_rerun_is_complete(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "a.fa", SEQS)
    emb = _shards(tmp_path, fa, tiny_model_dir, 2, "--chunk-size", 1)
    out = tmp_path / "m.parquet"
    first = CliRunner().invoke(cli, ["merge", str(emb), "-o", str(out)])
    assert first.exit_code == 0, first.output
    assert pq.ParquetFile(out).metadata.num_row_groups == 1
    assert pq.read_table(out)["id"].to_pylist() == [rid for rid, _ in SEQS]
    assert read_metadata(out)["identity"]["shard"] == "merged"
    again = CliRunner().invoke(cli, ["merge", str(emb), "-o", str(out)])
    assert again.exit_code == 0 and "already complete" in again.output


def test_stdin_redirected_from_the_output_file_is_refused(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "same.fa", SEQS)
    before = Path(fa).read_bytes()
    with open(fa, "rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "esm2cli", "embed", "-", "-o", fa, "-m", tiny_model_dir,
                               "--overwrite"], stdin=stdin, env=_env(), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "is the input file" in done.stderr
    assert Path(fa).read_bytes() == before


def test_refusals_are_one_message_without_usage_text(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "a.fa", SEQS)
    (tmp_path / "outdir").mkdir()
    result = embed(fa, "-o", tmp_path / "outdir", "-m", tiny_model_dir)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: {tmp_path / 'outdir'} is a directory: name a file "
                                                  "(or add --shard-count to write parts into it)"]  # fmt: skip


def test_a_read_only_output_directory_is_one_line_and_a_complete_output_is_still_complete(
    tmp_path, tiny_model_dir, small_disk
):
    fa = write_fasta(tmp_path / "a.fa", SEQS)
    assert embed(fa, "-o", small_disk / "done.parquet", "-m", tiny_model_dir).exit_code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    again = embed(fa, "-o", small_disk / "done.parquet", "-m", tiny_model_dir)
    assert again.exit_code == 0 and "already complete" in again.output
    new = embed(fa, "-o", small_disk / "new.parquet", "-m", tiny_model_dir)
    assert new.exit_code == 1 and "Read-only file system" in new.output and "Traceback" not in new.output
    assert len(new.output.strip().splitlines()) == 1
