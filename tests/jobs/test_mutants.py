import gzip

import pytest

from esm2cli.errors import MutantError
from esm2cli.jobs.mutants import Mutation, check_mutations, parse_mutant, read_mutants


def test_parses_single_and_multiple_substitutions():
    assert parse_mutant("A24G") == (Mutation("A", 24, "G"),)
    assert parse_mutant(" a24g : C30D ") == (Mutation("A", 24, "G"), Mutation("C", 30, "D"))
    assert str(parse_mutant("M1X")[0]) == "M1X"


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty mutant"),
        ("A24", "not a substitution such as A24G"),
        ("24G", "not a substitution such as A24G"),
        ("A-3G", "not a substitution such as A24G"),
        ("A24G;C30D", "not a substitution such as A24G"),
        ("A24G::C30D", "empty substitution"),
        ("A0G", "1-based"),
        ("A24*", "a stop (*) is not an ESM-2 residue"),
        ("A24J", "'J' is not an ESM-2 residue"),
        ("A24G:A24C", "position 24 appears more than once"),
        ("M\u0661G", "not a substitution such as A24G"),  # an Arabic-Indic one: not read as M1G
        ("M\uff11G", "not a substitution such as A24G"),  # a full-width one
        ("A1234567890G", "the position has 10 digits"),
    ],
)
def test_malformed_mutants_say_why(text, why):
    with pytest.raises(ValueError, match=None) as info:
        parse_mutant(text)
    assert why in str(info.value)


def test_a_huge_position_is_not_echoed_in_full(tmp_path):
    with pytest.raises(ValueError) as info:
        parse_mutant("A" + "7" * 5000 + "G")
    assert "5,000 digits" in str(info.value) and len(str(info.value)) < 200
    mutants = tmp_path / "m.csv"
    mutants.write_text("id,mutant\np," + "A" + "7" * 5000 + "G\n")
    (row,) = read_mutants(mutants)
    assert len(row.label()) < 100 and "5,002 characters" in row.label()


def test_checks_against_the_wild_type():
    seq = "MKTAY"
    assert check_mutations(parse_mutant("M1A:Y5W"), seq) is None
    assert "past the end of the sequence (5 residues)" in check_mutations(parse_mutant("A6G"), seq)
    assert "has 'K' at position 2, not 'A'" in check_mutations(parse_mutant("A2G"), seq)


def test_reads_csv_rows_with_their_line_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('\ufeffId,Mutant,note\np1,A2G,x\n\np2,"B3C:D4E",y\np3,nonsense,z\np4\n', encoding="utf-8")
    rows = list(read_mutants(path))
    assert [(r.line, r.id, r.mutant) for r in rows] == [
        (2, "p1", "A2G"),
        (4, "p2", "B3C:D4E"),
        (5, "p3", "nonsense"),
        (6, "p4", ""),
    ]
    assert [r.problem is None for r in rows] == [True, True, False, False]
    assert "expected at least 2" in rows[3].problem
    assert rows[2].label() == "line 5 ('p3', 'nonsense')"


def test_reads_tab_separated_and_gzip(tmp_path):
    path = tmp_path / "m.tsv.gz"
    path.write_bytes(gzip.compress(b"mutant\tid\nA2G\tp1\n"))
    (row,) = read_mutants(path)
    assert (row.id, row.mutations) == ("p1", (Mutation("A", 2, "G"),))


def test_id_column_may_be_left_out_for_a_single_protein(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("mutant\nA2G\n")
    assert [r.id for r in read_mutants(path, single_id="wt")] == ["wt"]
    with pytest.raises(MutantError, match="no 'id' column"):
        list(read_mutants(path))


@pytest.mark.parametrize(
    "content, why",
    [
        ("", "empty file"),
        ("\n\n", "empty file"),
        ("p1,A2G\n", "the first line must be a header with columns id,mutant"),
    ],
)
def test_unusable_files_are_refused(tmp_path, content, why):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(MutantError, match=why):
        list(read_mutants(path))


def test_missing_and_binary_files_are_refused(tmp_path):
    with pytest.raises(MutantError, match="no such file"):
        list(read_mutants(tmp_path / "nope.csv"))
    path = tmp_path / "bin.csv"
    path.write_bytes(b"id,mutant\n\xff\xfe,A2G\n")
    with pytest.raises(MutantError, match="not UTF-8"):
        list(read_mutants(path))


def test_a_byte_that_is_not_utf8_is_named_by_its_offset_in_the_list(tmp_path):
    data = ("id,mutant\n" + "p1,A2G\n" * 3000).encode() + b"p1,A2\x80\n"
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    bad = data.index(b"\x80")
    with pytest.raises(MutantError, match=rf"not UTF-8 text \(invalid start byte at byte {bad}\)$"):
        list(read_mutants(path))
