"""The checks of an output before a run writes it: embed and score both make them through io.targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esm2cli.config import ShardConfig
from esm2cli.errors import ConfigError, OutputExistsError
from esm2cli.io.parquet import TableWriter, read_metadata
from esm2cli.io.targets import check_target, is_complete, output_target
from tests.helpers import embed_cli, write_fasta

IDENTITY = {"input_sha256": "a" * 64, "model_identity": "w1", "dtype": "float32", "pooling": "mean"}


def written(path, identity: dict | None) -> str:
    """A real output whose metadata records ``identity`` (none: no esm2cli metadata at all)."""
    metadata = {b"esm2cli": json.dumps({"identity": identity}).encode()} if identity else None
    writer = TableWriter(path, pa.schema([pa.field("id", pa.string())], metadata=metadata))
    writer.write_columns({"id": ["p1"]})
    writer.commit()
    return str(path)


def test_output_target_is_the_output_or_a_shard_part(tmp_path):
    assert output_target(tmp_path / "o.parquet") == str(tmp_path / "o.parquet")
    shard = ShardConfig(index=1, count=4)
    assert output_target(tmp_path / "emb", shard) == str(tmp_path / "emb" / "part-00001-of-00004.parquet")


def test_an_output_that_is_a_link_is_written_through_it(tmp_path, tiny_model_dir):
    real, link = tmp_path / "data" / "real.parquet", tmp_path / "link.parquet"
    real.parent.mkdir()
    os.symlink(real, link)
    assert output_target(link) == str(real)
    assert output_target("/dev/stdout") == "/dev/stdout"  # refused by check_target, never followed
    first, second = write_fasta(tmp_path / "a.fa", [("a", "MKV")]), write_fasta(tmp_path / "b.fa", [("b", "MKVL")])
    embed_cli(first, link, tiny_model_dir, check=True)
    embed_cli(second, link, tiny_model_dir, "--overwrite", check=True)
    # before: the commit's rename replaced the link with the new file and left real.parquet holding the first run
    assert os.path.islink(link) and os.readlink(link) == str(real)
    assert pq.read_table(real).column("id").to_pylist() == ["b"]
    assert read_metadata(real)["input"].endswith("b.fa")


def test_an_output_that_is_an_input_is_refused_by_what_it_is(tmp_path):
    fasta, muts = tmp_path / "in.fa", tmp_path / "m.csv"
    fasta.write_text(">a\nMKV\n")
    muts.write_text("mutant\nM1A\n")
    os.symlink(fasta, tmp_path / "link.fa")
    inputs = {"the FASTA": str(fasta), "the mutant list": str(muts)}
    with pytest.raises(ConfigError, match=r"link.fa is the FASTA: name another output$"):
        check_target(str(tmp_path / "link.fa"), inputs)
    with pytest.raises(ConfigError, match=r"m.csv is the mutant list: name another output$"):
        check_target(str(muts), inputs)
    check_target(str(tmp_path / "out.parquet"), {**inputs, "the mutant list": None})  # no such input: fine


def test_a_directory_is_refused_with_the_callers_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory: name a file \(or add --shard-count\)$"):
        check_target(str(tmp_path), {"the input file": "-"}, directory_hint=" (or add --shard-count)")
    with pytest.raises(ConfigError, match=r"is a directory: name a file$"):
        check_target(str(tmp_path), {})


def test_stdin_redirected_from_the_output_is_refused(tmp_path):
    target = tmp_path / "x.fa"
    target.write_text(">a\nMKV\n")
    code = "import sys; from esm2cli.io.targets import check_target; check_target(sys.argv[1], {'the FASTA': '-'})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(target, "rb") as stdin:
        done = subprocess.run([sys.executable, "-c", code, str(target)], stdin=stdin, capture_output=True, text=True,
                              env=env)  # fmt: skip
    assert done.returncode == 1 and f"{target} is the FASTA: name another output" in done.stderr
    with open(os.devnull, "rb") as stdin:
        other = subprocess.run([sys.executable, "-c", code, str(target)], stdin=stdin, env=env)
    assert other.returncode == 0


def test_the_same_run_is_complete_and_another_is_named(tmp_path):
    out = written(tmp_path / "o.parquet", IDENTITY)
    assert is_complete(str(tmp_path / "none.parquet"), IDENTITY, overwrite=False) is False
    assert is_complete(out, IDENTITY, overwrite=False) is True
    changed = {**IDENTITY, "input_sha256": "b" * 64, "pooling": "bos"}
    with pytest.raises(OutputExistsError) as caught:
        is_complete(out, changed, overwrite=False)
    message = str(caught.value)
    assert message.startswith(f"{out} already exists, made by another run (")
    assert "the input's content changed" in message and "pooling" in message
    assert message.endswith("): add --overwrite to replace it")
    assert is_complete(out, changed, overwrite=True) is False


def test_a_foreign_file_or_an_unknown_identity_is_refused_without_overwrite(tmp_path):
    foreign = tmp_path / "f.parquet"
    foreign.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="already exists and is not esm2cli output .add --overwrite"):
        is_complete(str(foreign), IDENTITY, overwrite=False)
    out = written(tmp_path / "o.parquet", IDENTITY)
    with pytest.raises(OutputExistsError, match=r"already exists \(use --overwrite to replace it\)$"):
        is_complete(out, None, overwrite=False)  # a mutant list from stdin: never known to be the same run
    assert is_complete(out, None, overwrite=True) is False
    assert foreign.read_bytes() == b"precious"


def test_an_output_that_is_no_regular_file_is_refused_before_its_metadata_is_read(tmp_path):
    # A FIFO's metadata read waited for a writer for ever; a link to /proc/self/fd/1 (what /dev/stdout is) gave a
    # traceback, and with --overwrite the commit's rename replaced the link itself (as root: /dev/stdout, /dev/null).
    fifo, link = tmp_path / "out.fifo", tmp_path / "out.parquet"
    os.mkfifo(fifo)
    os.symlink("/proc/self/fd/1", link)
    for target in (fifo, link, "/dev/null", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"):
        with pytest.raises(ConfigError, match=r" is not a regular file \(a FIFO, a device, /dev/stdout\)"):
            check_target(str(target), {"the input file": str(tmp_path / "in.fa")})
    assert os.path.islink(link) and os.readlink(link) == "/proc/self/fd/1"
    os.symlink(tmp_path / "nothing-yet.parquet", tmp_path / "dangling.parquet")  # the commit creates its file
    check_target(str(tmp_path / "dangling.parquet"), {})
    check_target(str(tmp_path / "new.parquet"), {})
    if os.path.isdir("/dev/shm"):  # a tmpfs of plain files: a fine place for an output
        check_target("/dev/shm/esm2cli-no-such-output.parquet", {})


def test_an_output_under_a_file_is_named_as_such(tmp_path):
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKV\n")
    for target in (fasta / "out.parquet", fasta / "deeper" / "out.parquet"):
        with pytest.raises(ConfigError, match=r"in\.fa is a file, not a folder: name an output outside it"):
            check_target(str(target), {})
    check_target(str(tmp_path / "new" / "deeper" / "out.parquet"), {})  # folders made later: fine
