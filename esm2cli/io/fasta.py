"""FASTA input: opening (plain, gzip, stdin), parsing with Biopython, and record checks."""

from __future__ import annotations

import codecs
import gzip
import io
import itertools
import os
import sys
import unicodedata
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from Bio.SeqIO.FastaIO import SimpleFastaParser

from esm2cli.config import InputConfig
from esm2cli.errors import FastaError, StorageError
from esm2cli.io.records import Record, RecordHasher
from esm2cli.io.storage import open_input

# The residues ESM-2 was trained on: the 20 standard ones plus X (unknown), B, U, Z and O.
# The ESM vocabulary also has '.' and '-', but those are alignment gaps, not residues.
RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYXBUZO")
_GZIP_MAGIC = b"\x1f\x8b"
_WHITESPACE = str.maketrans("", "", " \t\r\n\v\f")
# Only ASCII is upper-cased: str.upper() would turn 'ß' into 'SS', 'ﬁ' into 'FI' and 'ı' into 'I',
# silently changing the protein. Other letters stay as they are and are refused by check_sequence.
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Fast paths for the common record (ASCII capitals, all of them residues): deleting the allowed bytes with
# bytes.translate leaves nothing, in ~0.3 us for a 365-residue protein against ~12 us for set(seq). The
# checks run twice per record (the scan, then the embed pass) on the thread that feeds every GPU.
_CAPITALS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_RESIDUE_BYTES = "".join(sorted(RESIDUES)).encode()


@dataclass
class FastaScan:
    """What a first pass over a FASTA file found."""

    records: int = 0
    sha256: str = ""
    record_digests: array[int] = field(default_factory=lambda: array("Q"))  # one a record, in file order
    record_lengths: array[int] = field(default_factory=lambda: array("I"))  # residues a record (0: invalid)
    valid: int = 0
    residues: int = 0
    too_long: int = 0
    invalid: list[Record] = field(default_factory=list)
    duplicate_ids: dict[str, int] = field(default_factory=dict)


def normalise(raw: str) -> str:
    """Upper-cases ASCII letters, removes white space and drops one trailing stop codon '*'."""
    if raw.isascii() and not raw.encode().translate(None, _CAPITALS):
        return raw  # already capitals only: nothing to change
    seq = raw.translate(_WHITESPACE).translate(_ASCII_UPPER)
    return seq[:-1] if seq.endswith("*") else seq


def check_sequence(seq: str) -> str | None:
    """Returns why a normalised sequence cannot be embedded, or None when it can."""
    if not seq:
        return "empty sequence"
    if seq.isascii() and not seq.encode().translate(None, _RESIDUE_BYTES):
        return None
    bad = sorted(set(seq) - RESIDUES)
    if not bad:
        return None
    first = min(seq.index(ch) for ch in bad) + 1
    shown = ", ".join(repr(ch) for ch in bad[:10])
    return (
        f"character(s) outside the ESM-2 alphabet: {shown} (first at residue {first}); "
        f"allowed: {''.join(sorted(RESIDUES))}"
    )


def check_text(text: str, what: str) -> str | None:
    """Returns why an id or header cannot be kept (a control character other than tab), or None."""
    if text.isprintable():
        return None  # no control character and no surrogate ('Other' categories are not printable)
    for index, ch in enumerate(text):
        if ch != "\t" and unicodedata.category(ch) in ("Cc", "Cs"):
            name = "a surrogate" if unicodedata.category(ch) == "Cs" else "a control character"
            return f"{what} holds {name} (U+{ord(ch):04X} at character {index + 1})"
    return None


def parse_record(title: str, raw_sequence: str, position: int) -> Record:
    """Builds a checked Record from a FASTA title line (without '>') and its raw sequence."""
    parts = title.strip().split(None, 1)
    rec_id = parts[0] if parts else ""
    description = parts[1] if len(parts) > 1 else ""
    sequence = normalise(raw_sequence)
    problem: str | None
    if not rec_id:
        problem = "no id (empty header line)"
    else:
        problem = check_text(title, "the header") or check_sequence(sequence)
    return Record(rec_id, description, sequence, position, problem)


def _binary_stream(raw: BinaryIO | io.RawIOBase) -> BinaryIO | io.BufferedReader | gzip.GzipFile:
    """The bytes of a stream, gunzipped when it starts with the gzip magic."""
    buffered: io.BufferedReader = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
    return gzip.GzipFile(fileobj=buffered, mode="rb") if buffered.peek(2)[:2] == _GZIP_MAGIC else buffered


def not_utf8(source: str | os.PathLike, exc: UnicodeDecodeError, span: tuple[int, int] | None = None) -> str:
    """What a decoding error says, at the offset of the bad byte in the file (in its text, for gzip).

    The error's own offset counts from the start of the block the text reader was decoding, not of the file;
    the file is read again, up to the bad byte, to find it (this runs only on the way to an error).
    """
    where = f"byte {exc.start} of a block"
    if str(source) != "-":
        try:
            where = f"byte {_first_bad_byte(source, span)}"
        except (OSError, StorageError, EOFError, ValueError):  # the message keeps the block's offset
            pass
    return f"{source}: not UTF-8 text ({exc.reason} at {where})"


def _first_bad_byte(source: str | os.PathLike, span: tuple[int, int] | None) -> int:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = span[0] if span else 0
    with open_input(source) as raw:
        stream = _binary_stream(_Span(raw, *span) if span else raw)  # type: ignore[arg-type]
        while block := stream.read(1 << 16):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                return offset - pending + exc.start
            offset += len(block)
    raise ValueError("no undecodable byte found")


def _text_stream(raw: BinaryIO | io.RawIOBase) -> TextIO:
    """Wraps a binary stream as UTF-8 text, gunzipping it when it starts with the gzip magic."""
    stream = _binary_stream(raw)
    # utf-8-sig drops a byte-order mark before the first header (Windows editors write one).
    return io.TextIOWrapper(stream, encoding="utf-8-sig", newline=None)


def _check_starts_with_header(lines: Iterator[str], source: str) -> Iterable[str]:
    """Refuses text that does not open with a '>' header: Biopython would skip it silently."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not line.startswith(">"):
            shown = line.strip()[:40]
            raise FastaError(f"{source}: line {number} is not a FASTA header (expected '>', found {shown!r})")
        return itertools.chain([line], lines)
    return iter(())


class _Span(io.RawIOBase):
    """Bytes [start, stop) of a local file, as a stream of their own."""

    def __init__(self, handle: io.BufferedReader, start: int, stop: int):
        handle.seek(start)
        self.handle, self.left = handle, stop - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: self.left]
        count = self.handle.readinto(view) or 0
        self.left -= count
        return count


@contextmanager
def open_fasta(source: str | os.PathLike, span: tuple[int, int] | None = None) -> Iterator[TextIO]:
    """Opens a FASTA file (plain or gzip; a path, an fsspec URL such as s3://..., or '-' for stdin) as text.

    Args:
        source: The file.
        span: Only bytes [start, stop) of a plain file (a shard's records, see esm2cli.io.split).

    Raises:
        FastaError: The file does not exist or cannot be read.
    """
    if str(source) == "-":
        yield _text_stream(sys.stdin.buffer)
        return
    try:
        with open_input(source) as raw, _text_stream(_Span(raw, *span) if span else raw) as text:  # type: ignore[arg-type]
            yield text
    except StorageError as exc:
        raise FastaError(str(exc)) from exc


def read_records(
    source: str | os.PathLike, max_length: int | None = None, span: tuple[int, int] | None = None
) -> Iterator[Record]:
    """Yields every record of a FASTA file in file order, each with its problem (or None).

    Args:
        source: A path, or '-' for stdin (a stream is read once only: see esm2cli.io.storage.spool).
        max_length: Sequences longer than this are invalid (--long-sequences error); None: no limit.
        span: Only the records in bytes [start, stop) of a plain file (a shard's, see esm2cli.io.split).

    Raises:
        FastaError: The file is missing, not UTF-8 text, a broken gzip, or not FASTA.
    """
    with open_fasta(source, span) as text:
        try:
            lines = _check_starts_with_header(iter(text), str(source))
            for position, (title, raw) in enumerate(SimpleFastaParser(lines), start=1):
                record = parse_record(title, raw, position)
                if max_length is not None and record.problem is None and len(record.sequence) > max_length:
                    record.problem = (
                        f"{len(record.sequence)} residues, longer than {max_length} "
                        "(--long-sequences error; use truncate or window to embed it)"
                    )
                yield record
        except UnicodeDecodeError as exc:
            raise FastaError(not_utf8(source, exc, span)) from exc
        except (gzip.BadGzipFile, EOFError, OSError) as exc:
            raise FastaError(f"{source}: cannot read ({exc})") from exc


def scan_fasta(
    source: str | os.PathLike,
    truncate: int | None = None,
    max_length: int | None = None,
    span: tuple[int, int] | None = None,
) -> FastaScan:
    """Reads a whole FASTA file once to count, check and find duplicate ids before any compute.

    Args:
        source: A path (not a stream such as stdin: spool it first).
        truncate: Residues counted per sequence at most, for progress estimates.
        max_length: Sequences longer than this are invalid (see read_records).
        span: Only the records in these bytes of a plain file (see read_records).

    Returns:
        The counts, the content hash of every record, the invalid records and the ids seen more
        than once (with their counts).
    """

    scan = FastaScan()
    hasher = RecordHasher(keep_digests=True)
    seen: set[str] = set()
    for record in read_records(source, max_length, span):
        scan.records += 1
        hasher.update(record)
        scan.record_lengths.append(0 if record.problem else len(record.sequence))
        if record.problem:
            scan.invalid.append(record)
            continue
        scan.valid += 1
        scan.residues += min(len(record.sequence), truncate or len(record.sequence))
        scan.too_long += truncate is not None and len(record.sequence) > truncate
        if record.id in seen:
            scan.duplicate_ids[record.id] = scan.duplicate_ids.get(record.id, 1) + 1
        seen.add(record.id)
    scan.sha256 = hasher.hexdigest()
    scan.record_digests = hasher.digests if hasher.digests is not None else array("Q")
    return scan


def describe_invalid(records: list[Record], limit: int = 20) -> str:
    """Formats invalid records as one line each (at most ``limit``) for the user."""
    lines = [f"{rec.label()}: {rec.problem}" for rec in records[:limit]]
    if len(records) > limit:
        lines.append(f"... and {len(records) - limit} more invalid records")
    return "\n".join(lines)


def describe_duplicates(duplicate_ids: dict[str, int], limit: int = 20) -> str:
    """Formats duplicate ids as one line each (at most ``limit``) for the user."""
    items = list(duplicate_ids.items())
    lines = [f"duplicate id '{rec_id}' ({count} records)" for rec_id, count in items[:limit]]
    if len(items) > limit:
        lines.append(f"... and {len(items) - limit} more duplicate ids")
    return "\n".join(lines)


def check_scan(scan: FastaScan, fasta: str, inputs: InputConfig, *, allow_empty: bool = False) -> None:
    """Stops the run before any compute when the input holds records it cannot embed.

    Every kind of problem is reported in one message (each list bounded), so that fixing the input
    takes one pass, not one run per kind.

    Raises:
        FastaError: Invalid records (without skip_invalid), duplicate ids (without
            allow_duplicate_ids), or nothing left to embed (unless ``allow_empty``: a shard's slice may
            hold no record). The message names the records.
    """
    problems = []
    if scan.invalid and not inputs.skip_invalid:
        problems.append(
            f"{len(scan.invalid)} of {scan.records} records cannot be embedded "
            f"(use --skip-invalid to embed the others):\n{describe_invalid(scan.invalid)}"
        )
    if scan.duplicate_ids and not inputs.allow_duplicate_ids:
        problems.append(
            f"{len(scan.duplicate_ids)} id(s) occur more than once "
            f"(use --allow-duplicate-ids to keep them all):\n{describe_duplicates(scan.duplicate_ids)}"
        )
    if len(problems) == 1:
        raise FastaError(f"{fasta}: {problems[0]}")
    if problems:
        raise FastaError(f"{fasta}: {len(problems)} problems:\n" + "\n".join(f"- {p}" for p in problems))
    if scan.valid == 0 and not allow_empty:
        raise FastaError(f"{fasta}: no records to embed" + (" (every record is invalid)" if scan.records else ""))
