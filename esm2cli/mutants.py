"""Mutant lists: the ``id,mutant`` CSV, mutant strings such as ``A24G:C30D``, and their checks."""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from esm2cli.errors import MutantError, StorageError
from esm2cli.fasta import RESIDUES
from esm2cli.storage import open_input

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # what --all-substitutions substitutes
_MUTATION = re.compile(r"^([A-Z*])(\d+)([A-Z*])$")
_GZIP_MAGIC = b"\x1f\x8b"


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
        return f"line {self.line} ({self.id!r}, {self.mutant!r})"


def parse_mutant(text: str) -> tuple[Mutation, ...]:
    """Parses ``A24G`` or several substitutions joined by ``:`` (1-based positions; case is ignored).

    Raises:
        ValueError: The text is not a mutant; the message says why.
    """
    if not text.strip():
        raise ValueError("empty mutant")
    mutations = []
    for part in text.split(":"):
        part = part.strip().upper()
        if not part:
            raise ValueError("an empty substitution between ':' separators")
        match = _MUTATION.match(part)
        if not match:
            raise ValueError(
                f"{part!r} is not a substitution such as A24G (wild type, 1-based position, mutant; "
                "several joined by ':')"
            )
        wt, position, mt = match.group(1), int(match.group(2)), match.group(3)
        if position < 1:
            raise ValueError(f"{part!r}: positions are 1-based")
        for letter in (wt, mt):
            if letter not in RESIDUES:
                what = "a stop (*)" if letter == "*" else repr(letter)
                raise ValueError(f"{part!r}: {what} is not an ESM-2 residue ({''.join(sorted(RESIDUES))})")
        mutations.append(Mutation(wt, position, mt))
    positions = [m.position for m in mutations]
    if len(set(positions)) != len(positions):
        twice = sorted({p for p in positions if positions.count(p) > 1})
        raise ValueError(f"position {twice[0]} appears more than once")
    return tuple(mutations)


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
    if buffered.peek(2)[:2] == _GZIP_MAGIC:
        buffered = gzip.GzipFile(fileobj=buffered, mode="rb")
    # utf-8-sig: spreadsheets often save CSV with a byte-order mark, which would stick to the first column name.
    return io.TextIOWrapper(buffered, encoding="utf-8-sig", newline="")


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
        raise MutantError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (csv.Error, gzip.BadGzipFile, EOFError) as exc:
        raise MutantError(f"{source}: cannot read ({exc})") from exc


def _row(fields: list[str], line: int, id_col: int | None, mutant_col: int, single_id: str | None) -> MutantRow:
    wanted = max(mutant_col, id_col or 0)
    rec_id = fields[id_col].strip() if id_col is not None and id_col < len(fields) else (single_id or "")
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


def describe_rows(rows: list[MutantRow], limit: int = 20) -> str:
    """Formats rows with problems as one line each (at most ``limit``) for the user."""
    lines = [f"{row.label()}: {row.problem}" for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more")
    return "\n".join(lines)
