import gzip
import io
import sys

import pytest

from esm2cli.errors import FastaError
from esm2cli.io.fasta import check_sequence, normalise, read_records, scan_fasta


def _records(tmp_path, text: str | bytes, name="in.fa"):
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return list(read_records(path))


def test_normalise_upper_case_whitespace_and_stop():
    assert normalise("mk v\tl a*\r") == "MKVLA"
    assert normalise("MK*V*") == "MK*V"  # only a trailing stop is dropped
    assert normalise("**") == "*"


def test_id_is_first_word_verbatim_and_rest_is_description(tmp_path):
    recs = _records(tmp_path, ">sp|P1/2 ü-nicode   Some protein  OS=X\nMKV\n>plain\nAA\n")
    assert [(r.id, r.description, r.sequence) for r in recs] == [
        ("sp|P1/2", "ü-nicode   Some protein  OS=X", "MKV"),
        ("plain", "", "AA"),
    ]
    assert [r.position for r in recs] == [1, 2]
    assert all(r.problem is None for r in recs)


def test_multiline_lowercase_crlf_and_blank_lines(tmp_path):
    recs = _records(tmp_path, b"\r\n>a desc\r\nmkv\r\n\r\nla*\r\n>b\r\nW\r\n")
    assert [(r.id, r.description, r.sequence) for r in recs] == [("a", "desc", "MKVLA"), ("b", "", "W")]


def test_gzip_detected_by_content_not_name(tmp_path):
    path = tmp_path / "no-gz-suffix.fa"
    path.write_bytes(gzip.compress(b">a\nMKV\n>b\nLLA\n"))
    assert [r.sequence for r in read_records(path)] == ["MKV", "LLA"]


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b">s1\nMKV\n")))
    assert [(r.id, r.sequence) for r in read_records("-")] == [("s1", "MKV")]


@pytest.mark.parametrize(
    "text, problem",
    [
        (">a\n\n>b\nMK\n", "empty sequence"),
        (">a\n*\n>b\nMK\n", "empty sequence"),
        (">\nMKV\n>b\nMK\n", "no id"),
        (">a\nMKJV\n>b\nMK\n", "'J' (first at residue 3)"),
        (">a\nMK-V\n>b\nMK\n", "'-'"),
        (">a\nMK1V\n>b\nMK\n", "'1'"),
        (">a\nMK*V\n>b\nMK\n", "'*'"),
        (">a\nMKVé\n>b\nMK\n", "'é'"),
    ],
)
def test_invalid_record_is_named_with_reason(tmp_path, text, problem):
    first, second = _records(tmp_path, text)
    assert first.problem is not None and problem in first.problem
    assert second.problem is None
    assert "record #1" in first.label()


def test_check_sequence_lists_allowed_alphabet():
    assert check_sequence("MKV") is None
    assert check_sequence("XBUZO") is None
    msg = check_sequence("MK.V")
    assert "'.'" in msg and "allowed: ABCDEFGHIKLMNOPQRSTUVWXYZ" in msg.replace("J", "")


@pytest.mark.parametrize(
    "content, message",
    [
        ("id,sequence\na,MKV\n", "line 1 is not a FASTA header"),
        ("\n\nhello\n>a\nMKV\n", "line 3 is not a FASTA header"),
        (b">a\nMK\xff\xfeV\n", "not UTF-8"),
        (b"\x1f\x8b\x08\x00garbage", "cannot read"),
    ],
)
def test_unreadable_files_raise_clear_errors(tmp_path, content, message):
    with pytest.raises(FastaError, match=message):
        _records(tmp_path, content)


def test_missing_file(tmp_path):
    with pytest.raises(FastaError, match="no such file"):
        list(read_records(tmp_path / "nope.fa"))


def test_empty_file_has_no_records(tmp_path):
    assert _records(tmp_path, "") == []
    assert _records(tmp_path, "\n\n") == []


def test_scan_counts_invalid_duplicates_and_long(tmp_path):
    path = tmp_path / "in.fa"
    path.write_text(">a\nMKV\n>b\nMK1\n>a\nMMMMM\n>c\n\n>a\nL\n")
    scan = scan_fasta(path, truncate=4)
    assert (scan.records, scan.valid, scan.too_long) == (5, 3, 1)
    assert [r.id for r in scan.invalid] == ["b", "c"]
    assert scan.duplicate_ids == {"a": 3}
    assert scan.residues == 3 + 4 + 1


def test_a_span_reads_only_the_records_in_those_bytes(tmp_path):
    path = tmp_path / "in.fa"
    path.write_bytes(b">a\r\nMK\r\nV\r\n>b x\nMKVL\n>c\nW\n")
    start = path.read_bytes().index(b">b")
    assert [(r.id, r.sequence) for r in read_records(path, span=(start, start + 10))] == [("b", "MKVL")]
    assert [r.position for r in read_records(path, span=(start, path.stat().st_size))] == [1, 2]


def _embed(*args):
    from click.testing import CliRunner

    from esm2cli.cli import cli

    result = CliRunner().invoke(cli, ["embed", *map(str, args), "--dtype", "float32", "--devices", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return result


def test_seven_shards_of_mixed_widths_and_crlf_hold_every_record_once_with_the_unsharded_vectors(
    tmp_path, tiny_model_dir
):
    import numpy as np
    import pyarrow.parquet as pq
    from test_split import mixed_fasta

    data, records = mixed_fasta(45, seed=11)
    path = tmp_path / "in.fa"
    path.write_bytes(data)
    _embed(path, "-o", tmp_path / "whole.parquet", "-m", tiny_model_dir)
    for index in range(7):
        _embed(path, "-o", tmp_path / "parts", "-m", tiny_model_dir, "--shard-count", 7, "--shard-index", index)
    parts = [pq.read_table(tmp_path / "parts" / f"part-{i:05d}-of-00007.parquet") for i in range(7)]
    whole = pq.read_table(tmp_path / "whole.parquet")
    ids = [rec_id for part in parts for rec_id in part["id"].to_pylist()]
    assert ids == [rec_id for rec_id, _ in records] == whole["id"].to_pylist()  # each once, in input order
    sharded = np.concatenate([np.array(part["embedding"].to_pylist(), np.float32) for part in parts])
    # equal up to float32 rounding: other batches sum in another order on this CPU backend
    np.testing.assert_allclose(sharded, np.array(whole["embedding"].to_pylist(), np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compress", [False, True])
def test_a_byte_that_is_not_utf8_is_named_by_its_offset_in_the_file(tmp_path, compress):
    # The decoder's offset counts from the block it was decoding: byte 20,006 was reported as byte 7,718.
    good = "".join(f">r{i}\n{'MKTAYIAKQR' * 6}\n" for i in range(300)).encode()
    data = good + b">z\nMK\x80V\n"
    path = tmp_path / ("in.fa.gz" if compress else "in.fa")
    path.write_bytes(gzip.compress(data) if compress else data)
    bad = data.index(b"\x80")
    with pytest.raises(FastaError, match=rf": not UTF-8 text \(invalid start byte at byte {bad}\)$"):
        list(read_records(path))
    start = good.rindex(b">r150")  # a shard's span: the offset is still the file's
    if not compress:
        with pytest.raises(FastaError, match=rf"at byte {bad}\)$"):
            list(read_records(path, span=(start, len(data))))
