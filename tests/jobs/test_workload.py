"""Seeded synthetic proteins: reproducible, within their length bounds, written as valid FASTA."""

from __future__ import annotations

from Bio import SeqIO

from esm2cli.jobs.workload import (
    MAX_LENGTH,
    MIN_LENGTH,
    draw_sequences,
    fasta_text,
    synthetic_sequences,
    write_fasta,
)

ALPHABET = set("ARNDCQEGHILKMFPSTWYV")


def test_the_same_seed_gives_the_same_proteins():
    assert list(synthetic_sequences(20, seed=3)) == list(synthetic_sequences(20, seed=3))
    assert list(synthetic_sequences(20, seed=3)) != list(synthetic_sequences(20, seed=4))
    assert draw_sequences(50, seed=1) == draw_sequences(50, seed=1)


def test_lengths_and_letters_stay_in_bounds():
    for _, seq in synthetic_sequences(300, seed=0, max_length=400):
        assert MIN_LENGTH <= len(seq) <= 400 and seq[0] == "M" and set(seq) <= ALPHABET
    drawn = draw_sequences(2000, seed=0)
    assert all(MIN_LENGTH <= len(s) <= MAX_LENGTH and set(s) <= ALPHABET for s in drawn)
    assert 200 < sorted(map(len, drawn))[1000] < 450  # a UniProt-like median of about 300


def test_written_fasta_reads_back_with_biopython(tmp_path):
    path = tmp_path / "synth.fasta"
    write_fasta(str(path), 25, seed=2)
    records = [(r.id, str(r.seq)) for r in SeqIO.parse(path, "fasta")]
    assert records == list(synthetic_sequences(25, seed=2))
    text_path = tmp_path / "text.fasta"
    seqs = draw_sequences(7, seed=5)
    text_path.write_text(fasta_text(seqs, prefix="q", width=13))
    assert [(r.id, str(r.seq)) for r in SeqIO.parse(text_path, "fasta")] == [(f"q{i}", s) for i, s in enumerate(seqs)]
