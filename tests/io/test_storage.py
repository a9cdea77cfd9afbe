"""Local inputs that stream (FIFOs, pipes named /dev/fd/N, stdin): told apart by stat alone, copied once."""

from __future__ import annotations

import errno
import io
import os
import sys
import threading

import pytest

from esm2cli.errors import OutputError, StorageError
from esm2cli.io.storage import AtomicFile, is_stream, spool, write_errors
from helpers import fed_fifo, within


def test_is_stream_tells_pipes_from_files_without_opening_them(tmp_path):
    (tmp_path / "a.fa").write_text(">a\nMKV\n")
    os.mkfifo(tmp_path / "in.fifo")  # no writer: an open for reading would wait forever
    assert within(10, is_stream, tmp_path / "in.fifo") is True
    read, write = os.pipe()
    try:
        assert is_stream(f"/dev/fd/{read}") is True  # bash's <(zcat x.gz)
    finally:
        os.close(read)
        os.close(write)
    assert is_stream("-") is True
    assert is_stream("/dev/null") is True  # a character device
    for path in (tmp_path / "a.fa", tmp_path, tmp_path / "missing.fa", "s3://bucket/a.fa"):
        assert is_stream(path) is False, path


def test_spool_copies_a_fifo_a_pipe_and_stdin_once(tmp_path, monkeypatch):
    data = b">a\nMKV\n" * 100_000  # larger than a pipe's buffer: the writer waits on the copy
    fed_fifo(tmp_path / "in.fifo", data)
    copies = [within(30, spool, tmp_path / "in.fifo", str(tmp_path))]
    read, write = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write, data[:1000]), os.close(write)), daemon=True)
    writer.start()
    copies.append(within(30, spool, f"/dev/fd/{read}", str(tmp_path)))
    os.close(read)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data[:7])))
    copies.append(spool("-", str(tmp_path)))
    for copy, want in zip(copies, [data, data[:1000], data[:7]], strict=True):
        assert os.path.isfile(copy) and not is_stream(copy)
        with open(copy, "rb") as handle:
            assert handle.read() == want


def test_spool_of_an_unreadable_stream_names_it_and_leaves_no_copy(tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    with pytest.raises(StorageError, match="missing.fifo: no such file"):
        spool(tmp_path / "missing.fifo", str(spool_dir))
    assert os.listdir(spool_dir) == []


def test_spool_sweeps_the_copies_killed_runs_left_and_keeps_live_ones(tmp_path, monkeypatch):
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its copy is a leftover of a run killed before its cleanup
    left = tmp_path / f"esm2cli-stream-{dead_pid}-abc123"
    live = tmp_path / f"esm2cli-stream-{os.getppid()}-def456"  # a live process's copy stays
    other = tmp_path / "esm2cli-stream-notes"  # not of the pattern: stays
    for path in (left, live, other):
        path.write_bytes(b">a\nMKV\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b">b\nGG\n")))
    copy = spool("-", str(tmp_path))
    assert not left.exists() and live.exists() and other.exists()
    assert os.path.basename(copy).startswith(f"esm2cli-stream-{os.getpid()}-")


def test_an_atomic_file_block_commits_when_it_ends_and_leaves_the_old_file_when_it_raises(tmp_path):
    target = tmp_path / "out.bin"
    with AtomicFile(target) as out:
        out.handle.write(b"first")
        assert not target.exists()  # nothing at the final path until the block ends
    assert target.read_bytes() == b"first"
    with pytest.raises(KeyboardInterrupt), AtomicFile(target) as out:
        out.handle.write(b"second, half written")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["out.bin"]  # no temporary left


def test_a_full_disk_at_the_commit_is_the_same_line_as_during_the_write(tmp_path, monkeypatch):
    # a small output sits in the file's buffer until the commit: its full disk comes up there, as a StorageError
    out = tmp_path / "h.tsv"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as caught, write_errors(str(out)), AtomicFile(str(out)) as atomic:
        atomic.handle.write(b"query\n")
    assert str(caught.value) == f"{out}: cannot write (No space left on device)"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_pyarrows_wording_names_its_own_errno():
    with pytest.raises(OutputError) as caught, write_errors("h.parquet", "hits"):
        raise OSError("Error writing bytes to file. Detail: [errno 27] File too large")
    assert str(caught.value) == "h.parquet: cannot write the hits (File too large)"
