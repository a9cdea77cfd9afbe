"""Hits written out: TSV with its header, m8 of BLAST's 12 columns that a tabular reader parses, Parquet; a file
appears only when complete."""

from __future__ import annotations

import io
import types

import pandas as pd
import pyarrow.parquet as pq
import pytest

from esm2cli.errors import ConfigError, OutputExistsError
from esm2cli.search.hits import M8_COLUMNS, HitWriter, check_output
from esm2cli.search.index import Hit

QUERIES = [("q1", 120), ("q2", 33)]
HITS = [
    [Hit("t9", 0.93, 1.5e-12, 1, 300), Hit("t2", -0.25, None, 2, 80)],
    [Hit("t5", 0.5, 0.02, 1, 44)],
]


def _write(path, fmt):
    with HitWriter(str(path), fmt) as writer:
        writer.write(QUERIES, HITS)
    return writer


def test_m8_has_blasts_12_columns_and_parses(tmp_path):
    _write(tmp_path / "h.m8", "m8")
    table = pd.read_csv(tmp_path / "h.m8", sep="\t", header=None, names=M8_COLUMNS)
    assert len(M8_COLUMNS) == 12 and table.shape == (3, 12)
    first = table.iloc[0]
    assert (first.qseqid, first.sseqid, first.length, first.qend, first.send) == ("q1", "t9", 120, 120, 300)
    assert (first.mismatch, first.gapopen, first.qstart, first.sstart) == (0, 0, 1, 1)
    assert first.pident == pytest.approx(93.0) and first.bitscore == pytest.approx(0.93)
    assert first.evalue == pytest.approx(1.5e-12)
    assert table.iloc[1].pident == 0 and pd.isna(table.iloc[1].evalue)  # clipped at 0; no E-value: NA


def test_tsv_has_a_header_and_one_line_a_hit(tmp_path):
    writer = _write(tmp_path / "h.tsv", "tsv")
    table = pd.read_csv(tmp_path / "h.tsv", sep="\t")
    assert list(table.columns) == ["query", "target", "score", "evalue", "rank"] and writer.hits == 3
    assert table["target"].tolist() == ["t9", "t2", "t5"] and table["rank"].tolist() == [1, 2, 1]


def test_parquet_keeps_both_lengths_and_a_null_evalue(tmp_path):
    _write(tmp_path / "h.parquet", "parquet")
    table = pq.read_table(tmp_path / "h.parquet").to_pydict()
    assert table["query_length"] == [120, 120, 33] and table["target_length"] == [300, 80, 44]
    assert table["evalue"][1] is None


def test_stdout_gets_the_hits(capsysbinary):
    _write("-", "tsv")
    assert capsysbinary.readouterr().out.decode().splitlines()[1].startswith("q1\tt9\t0.930000\t1.5e-12\t1")


class _PartialWrites(io.RawIOBase):
    """A raw stdout (PYTHONUNBUFFERED, as the image sets) that takes at most 7 bytes a write, as a write does
    that reaches a file size limit or a full disk."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        taken = bytes(memoryview(b).cast("B")[:7])
        self.data += taken
        return len(taken)


@pytest.mark.parametrize("fmt", ["tsv", "m8", "parquet"])
def test_an_unbuffered_stdout_gets_every_byte(fmt, tmp_path, monkeypatch):
    _write(tmp_path / f"h.{fmt}", fmt)
    raw = _PartialWrites()
    monkeypatch.setattr("sys.stdout", types.SimpleNamespace(buffer=raw))
    _write("-", fmt)
    assert bytes(raw.data) == (tmp_path / f"h.{fmt}").read_bytes()


def test_a_failed_search_leaves_the_earlier_file_as_it_was(tmp_path):
    path = tmp_path / "h.tsv"
    path.write_text("earlier\n")
    with pytest.raises(RuntimeError), HitWriter(str(path), "tsv") as writer:
        writer.write(QUERIES, HITS)
        raise RuntimeError("the search failed")
    assert path.read_text() == "earlier\n" and [p.name for p in tmp_path.iterdir()] == ["h.tsv"]


def test_an_existing_file_needs_overwrite_and_a_folder_is_refused(tmp_path):
    (tmp_path / "h.tsv").write_text("x")
    with pytest.raises(OutputExistsError, match="h.tsv already exists: add --overwrite"):
        check_output(str(tmp_path / "h.tsv"), overwrite=False)
    check_output(str(tmp_path / "h.tsv"), overwrite=True)
    with pytest.raises(ConfigError, match="is a directory"):
        check_output(str(tmp_path), overwrite=True)
