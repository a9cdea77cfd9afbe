"""Mutant lists: the ``id,mutant`` CSV, mutant strings such as ``A24G:C30D``, and their checks."""

from __future__ import annotations

import csv
import functools
import gzip
import io
import logging
import os
import re
import sys
import typing
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from esm2cli.errors import MutantError, StorageError
from esm2cli.io.fasta import RESIDUES, not_utf8
from esm2cli.io.storage import open_input

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # what --all-substitutions substitutes
# ASCII digits only: \d would take '١' (Arabic-Indic one) and int() would read it as 1.
_MUTATION = re.compile(r"^([A-Z*])([0-9]+)([A-Z*])$")
_MAX_POSITION_DIGITS = 9  # no protein is near a billion residues; longer numbers are refused, not echoed
_QUOTED = 40  # characters of a rejected substitution quoted in a message


def _shown(part: str) -> str:
    """A substitution as quoted in an error: cut to a readable length (a 5,000-digit position is not echoed)."""
    return repr(part) if len(part) <= _QUOTED else f"{part[:_QUOTED]!r}... ({len(part):,} characters)"


_GZIP_MAGIC = b"\x1f\x8b"
_SHOWN = 20  # rows with problems named in a message; the rest are counted

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Mutation:
    """One substitution: the wild-type letter, its 1-based position, the mutant letter."""

    wt: str
    position: int
    mt: str

    def __str__(self) -> str:
        return f"{self.wt}{self.position}{self.mt}"


@dataclass(slots=True)
class MutantRow:
    """One data row of a mutant list.

    Attributes:
        line: The row's line number in the file (the header is line 1).
        id: The protein's id (a FASTA record id).
        mutant: The mutant as written (white space around it removed).
        mutations: The parsed substitutions (empty when the row has a problem).
        problem: Why the row cannot be scored, or None.
    """

    line: int
    id: str
    mutant: str
    mutations: tuple[Mutation, ...] = ()
    problem: str | None = None

    def label(self) -> str:
        """Names the row for messages: its line, id and mutant."""
        return f"line {self.line} ({self.id!r}, {_shown(self.mutant)})"


def parse_mutant(text: str) -> tuple[Mutation, ...]:
    """Parses ``A24G`` or several substitutions joined by ``:`` (1-based positions; case is ignored).

    Raises:
        ValueError: The text is not a mutant; the message says why.
    """
    if not text.strip():
        raise ValueError("empty mutant")
    mutations = tuple(_parse_substitution(part.strip().upper()) for part in text.split(":"))
    if len(mutations) > 1:
        positions = [m.position for m in mutations]
        if len(set(positions)) != len(positions):
            twice = sorted({p for p in positions if positions.count(p) > 1})
            raise ValueError(f"position {twice[0]} appears more than once")
    return mutations


@functools.lru_cache(maxsize=1 << 16)  # a long mutant list repeats the same substitutions many times
def _parse_substitution(part: str) -> Mutation:
    if not part:
        raise ValueError("an empty substitution between ':' separators")
    match = _MUTATION.match(part)
    if not match:
        raise ValueError(
            f"{_shown(part)} is not a substitution such as A24G (wild type, 1-based position in ASCII digits, "
            "mutant; several joined by ':')"
        )
    if len(match.group(2)) > _MAX_POSITION_DIGITS:
        raise ValueError(f"{_shown(part)}: the position has {len(match.group(2)):,} digits; no protein is that long")
    wt, position, mt = match.group(1), int(match.group(2)), match.group(3)
    if position < 1:
        raise ValueError(f"{_shown(part)}: positions are 1-based")
    for letter in (wt, mt):
        if letter not in RESIDUES:
            what = "a stop (*)" if letter == "*" else repr(letter)
            raise ValueError(f"{_shown(part)}: {what} is not an ESM-2 residue ({''.join(sorted(RESIDUES))})")
    return Mutation(wt, position, mt)


def check_mutations(mutations: tuple[Mutation, ...], sequence: str) -> str | None:
    """Returns why the substitutions do not fit this wild-type sequence, or None when they do."""
    for m in mutations:
        if m.position > len(sequence):
            return f"{m}: position {m.position} is past the end of the sequence ({len(sequence)} residues)"
        if sequence[m.position - 1] != m.wt:
            return f"{m}: the wild type has {sequence[m.position - 1]!r} at position {m.position}, not {m.wt!r}"
    return None


def _text(raw) -> io.TextIOWrapper:
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)
    binary: typing.IO[bytes] = buffered
    if buffered.peek(2)[:2] == _GZIP_MAGIC:
        binary = typing.cast(typing.IO[bytes], gzip.GzipFile(fileobj=buffered, mode="rb"))
    # utf-8-sig: spreadsheets often save CSV with a byte-order mark, which would stick to the first column name.
    return io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")


def _columns(header: list[str], source: str, single_id: str | None) -> tuple[int | None, int]:
    names = [name.strip().lower() for name in header]
    if "mutant" not in names:
        found = ", ".join(repr(n) for n in header[:10]) or "nothing"
        raise MutantError(f"{source}: the first line must be a header with columns id,mutant (found {found})")
    if "id" not in names and single_id is None:
        raise MutantError(f"{source}: no 'id' column (it may be left out only when the FASTA holds one protein)")
    return (names.index("id") if "id" in names else None), names.index("mutant")


def read_mutants(source: str | os.PathLike, single_id: str | None = None) -> Iterator[MutantRow]:
    """Yields the rows of a mutant list, each parsed, with its problem (or None).

    The file is CSV (or tab-separated) with a header naming the columns ``id`` and ``mutant``; other
    columns are ignored, blank lines skipped. Plain or gzip, a path or an fsspec URL.

    Args:
        source: The file.
        single_id: The id rows take when the file has no ``id`` column (the FASTA's one protein).

    Raises:
        MutantError: The file is missing, empty, not UTF-8 text, or has no usable header.
    """
    try:
        with open_input(source) as raw, _text(raw) as text:
            header_line = text.readline()
            if not header_line.strip():
                raise MutantError(f"{source}: empty file (expected a header line id,mutant and one row per mutant)")
            delimiter = "\t" if "\t" in header_line and "," not in header_line else ","
            header = next(csv.reader([header_line], delimiter=delimiter))
            id_col, mutant_col = _columns(header, str(source), single_id)
            reader = csv.reader(text, delimiter=delimiter)
            for fields in reader:
                if not any(f.strip() for f in fields):
                    continue
                yield _row(fields, reader.line_num + 1, id_col, mutant_col, single_id)
    except StorageError as exc:
        raise MutantError(str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise MutantError(not_utf8(source, exc)) from exc
    except (csv.Error, gzip.BadGzipFile, EOFError) as exc:
        raise MutantError(f"{source}: cannot read ({exc})") from exc


def _row(fields: list[str], line: int, id_col: int | None, mutant_col: int, single_id: str | None) -> MutantRow:
    wanted = max(mutant_col, id_col or 0)
    # Interned: a long list names few proteins, and each row would otherwise hold its own copy of the id.
    rec_id = sys.intern(fields[id_col].strip()) if id_col is not None and id_col < len(fields) else (single_id or "")
    mutant = fields[mutant_col].strip() if mutant_col < len(fields) else ""
    row = MutantRow(line, rec_id, mutant)
    if len(fields) <= wanted:
        row.problem = f"{len(fields)} field(s), expected at least {wanted + 1}"
    elif not rec_id:
        row.problem = "empty id"
    else:
        try:
            row.mutations = parse_mutant(mutant)
        except ValueError as exc:
            row.problem = str(exc)
    return row


def describe_rows(rows: list[MutantRow], total: int) -> str:
    """Formats rows with problems as one line each for the user, with how many more there are of ``total``."""
    lines = [f"{row.label()}: {row.problem}" for row in rows]
    if total > len(rows):
        lines.append(f"... and {total - len(rows):,} more")
    return "\n".join(lines)


@dataclass
class MutantTable:
    """The mutants to score, in file order, kept compact: a list of millions of rows stays small.

    Attributes:
        ids, mutants: The output's id and mutant columns, one entry per row (as written).
        proteins: The ids named by the rows, in order of first appearance.
        row, protein, position, wt, mt: One entry per substitution: its row, its protein (an index
            into ``proteins``), its 0-based position and the ASCII codes of its two letters.
        skipped: Rows skipped as invalid.
    """

    ids: list[str] = field(default_factory=list)
    mutants: list[str] = field(default_factory=list)
    proteins: list[str] = field(default_factory=list)
    row: array = field(default_factory=lambda: array("q"))
    protein: array = field(default_factory=lambda: array("q"))
    position: array = field(default_factory=lambda: array("q"))
    wt: array = field(default_factory=lambda: array("B"))
    mt: array = field(default_factory=lambda: array("B"))
    skipped: int = 0
    _protein_index: dict[str, int] = field(default_factory=dict)

    def add(self, row: MutantRow) -> None:
        """Appends a checked row."""
        k = self._protein_index.get(row.id)
        if k is None:
            k = self._protein_index[row.id] = len(self.proteins)
            self.proteins.append(row.id)
        n = len(self.ids)
        self.ids.append(row.id)
        self.mutants.append(row.mutant)
        for m in row.mutations:
            self.row.append(n)
            self.protein.append(k)
            self.position.append(m.position - 1)
            self.wt.append(ord(m.wt))
            self.mt.append(ord(m.mt))

    def columns(self) -> dict[str, np.ndarray]:
        """The substitutions as numpy arrays: row, protein, position (int64), wt, mt (uint8 ASCII codes)."""
        return {
            "row": np.frombuffer(self.row, dtype=np.int64),
            "protein": np.frombuffer(self.protein, dtype=np.int64),
            "position": np.frombuffer(self.position, dtype=np.int64),
            "wt": np.frombuffer(self.wt, dtype=np.uint8),
            "mt": np.frombuffer(self.mt, dtype=np.uint8),
        }

    def by_protein(self) -> list[np.ndarray]:
        """For each protein, the indices of its substitutions."""
        protein = self.columns()["protein"]
        order = np.argsort(protein, kind="stable")
        bounds = np.searchsorted(protein[order], np.arange(len(self.proteins) + 1))
        return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def read_mutant_table(
    source: str | os.PathLike,
    sequences: dict[str, str],
    skip_invalid: bool,
    skipped_ids: frozenset[str] = frozenset(),
    single_id: str | None = None,
) -> MutantTable:
    """Reads a mutant list and checks every row against the wild types, before any compute.

    Args:
        source: The CSV (see read_mutants).
        sequences: The wild-type sequence of each id.
        skip_invalid: Skip (and report) the rows that cannot be scored instead of stopping.
        skipped_ids: Ids of FASTA records skipped as invalid (their rows are named as such).
        single_id: The id rows take when the file has no ``id`` column.

    Raises:
        MutantError: The file is unusable, holds no row, holds rows that cannot be scored (without
            skip_invalid; the message names them, 20 at most), or none that can.
    """
    table = MutantTable()
    bad: list[MutantRow] = []
    rows = 0
    for row in read_mutants(source, single_id):
        rows += 1
        if row.problem is None:
            sequence = sequences.get(row.id)
            if sequence is None:
                why = "its FASTA record is invalid and was skipped" if row.id in skipped_ids else "not in the FASTA"
                row.problem = f"unknown id {row.id!r} ({why})"
            else:
                row.problem = check_mutations(row.mutations, sequence)
        if row.problem is None:
            table.add(row)
        else:
            table.skipped += 1
            if len(bad) < _SHOWN:
                bad.append(row)
    if rows == 0:
        raise MutantError(f"{source}: no mutants (a header and no rows)")
    if bad and not skip_invalid:
        raise MutantError(
            f"{source}: {table.skipped:,} of {rows:,} mutants cannot be scored "
            f"(use --skip-invalid to score the others):\n{describe_rows(bad, table.skipped)}"
        )
    if bad:
        log.warning("skipping %d mutant(s):\n%s", table.skipped, describe_rows(bad, table.skipped))
    if not table.ids:
        raise MutantError(f"{source}: no mutant can be scored")
    return table
