"""The embed pipeline's input: a stream is read once, into a copy that the run reads as often as it needs."""

from __future__ import annotations

import os

import pytest

from esm2cli.errors import FastaError, MutantError
from esm2cli.jobs.pipeline import readable_source
from helpers import fed_fifo


def test_a_file_is_read_in_place(tmp_path):
    (tmp_path / "a.fa").write_text(">a\nMKV\n")
    with readable_source(tmp_path / "a.fa") as path:
        assert path == str(tmp_path / "a.fa")
    assert (tmp_path / "a.fa").exists()


def test_a_fifo_is_copied_once_and_the_copy_removed(tmp_path):
    writer = fed_fifo(tmp_path / "in.fifo", b">a\nMKV\n")
    with readable_source(tmp_path / "in.fifo") as path:
        writer.join(30)
        assert not writer.is_alive()
        for _ in range(2):  # as often as the run needs: the check pass, then the compute
            with open(path, "rb") as handle:
                assert handle.read() == b">a\nMKV\n"
    assert not os.path.exists(path)


def test_errors_name_the_input_as_given_not_its_copy(tmp_path):
    fed_fifo(tmp_path / "in.fifo", b"not fasta\n")
    with pytest.raises(MutantError) as caught, readable_source(tmp_path / "in.fifo") as path:
        raise MutantError(f"{path}: line 1 is not a header", param="mutations")
    assert str(caught.value) == f"{tmp_path / 'in.fifo'}: line 1 is not a header"
    assert caught.value.param == "mutations" and not os.path.exists(path)


def test_a_stream_that_cannot_be_opened_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr("esm2cli.io.storage.is_stream", lambda source: True)  # a FIFO gone before it was opened
    with pytest.raises(FastaError, match="gone.fifo: no such file"), readable_source(tmp_path / "gone.fifo"):
        pass
    with pytest.raises(MutantError), readable_source(tmp_path / "gone.fifo", error=MutantError):
        pass
