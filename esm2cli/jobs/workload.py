"""Seeded synthetic proteins of UniProt-like lengths and composition, for demos, tests and benchmarks."""

from __future__ import annotations

import random
from collections.abc import Iterator

# UniProtKB/Swiss-Prot amino-acid composition, in percent.
_COMPOSITION = {
    "A": 8.25,
    "R": 5.53,
    "N": 4.06,
    "D": 5.45,
    "C": 1.37,
    "Q": 3.93,
    "E": 6.75,
    "G": 7.07,
    "H": 2.27,
    "I": 5.96,
    "L": 9.66,
    "K": 5.84,
    "M": 2.42,
    "F": 3.86,
    "P": 4.70,
    "S": 6.56,
    "T": 5.34,
    "W": 1.08,
    "Y": 2.92,
    "V": 6.87,
}
# Log-normal lengths with median ~ 300 residues, the shape of UniProt's length histogram.
_LOG_MEDIAN, _LOG_SIGMA = 5.7, 0.65
MIN_LENGTH, MAX_LENGTH = 30, 2000


def synthetic_sequences(n: int, seed: int = 0, max_length: int = MAX_LENGTH) -> Iterator[tuple[str, str]]:
    """Yields ``n`` (id, sequence) pairs; the same seed always gives the same proteins.

    Args:
        n: How many proteins.
        seed: The random seed.
        max_length: Longest sequence drawn (lengths are clipped to [30, max_length]).
    """
    rng = random.Random(seed)
    residues, weights = list(_COMPOSITION), list(_COMPOSITION.values())
    for i in range(n):
        length = int(min(max(rng.lognormvariate(_LOG_MEDIAN, _LOG_SIGMA), MIN_LENGTH), max_length))
        yield f"synth_{seed}_{i:07d}", "M" + "".join(rng.choices(residues, weights, k=length - 1))


def write_fasta(path: str, n: int, seed: int = 0, max_length: int = MAX_LENGTH) -> None:
    """Writes ``n`` synthetic proteins to a FASTA file, 60 residues a line."""
    with open(path, "w") as out:
        for rec_id, seq in synthetic_sequences(n, seed, max_length):
            out.write(f">{rec_id} synthetic protein, {len(seq)} aa\n")
            out.writelines(seq[i : i + 60] + "\n" for i in range(0, len(seq), 60))


def draw_sequences(n: int, seed: int = 0, max_length: int = MAX_LENGTH) -> list[str]:
    """``n`` proteins of the same length and composition distributions as synthetic_sequences, drawn
    with numpy (about 50x faster, for benchmarks that need tens of thousands); not the same proteins.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(_LOG_MEDIAN, _LOG_SIGMA, n), MIN_LENGTH, max_length).astype(np.int64)
    # A table of 10,000 letters in the composition's proportions: one integer draw per residue.
    counts = [round(100 * pct) for pct in _COMPOSITION.values()]
    table = np.frombuffer("".join(aa * c for aa, c in zip(_COMPOSITION, counts, strict=True)).encode(), np.uint8)
    text = table[rng.integers(0, len(table), size=int(lengths.sum()))].tobytes().decode("ascii")
    ends = np.cumsum(lengths)
    return ["M" + text[end - length + 1 : end] for end, length in zip(ends.tolist(), lengths.tolist(), strict=True)]


def fasta_text(seqs: list[str], prefix: str = "p", width: int = 60) -> str:
    """The FASTA text of sequences named ``<prefix><index>``, ``width`` residues a line."""
    lines = []
    for i, seq in enumerate(seqs):
        lines.append(f">{prefix}{i} synthetic protein, {len(seq)} aa")
        lines += [seq[k : k + width] for k in range(0, len(seq), width)]
    return "\n".join(lines) + "\n"
