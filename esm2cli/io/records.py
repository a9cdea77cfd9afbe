"""One FASTA record as read and normalised, and the hash of records as they stream by."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class Record:
    """One FASTA record, normalised.

    Attributes:
        id: The header's first word, verbatim.
        description: The rest of the header.
        sequence: Upper case, white space removed, a trailing '*' dropped.
        position: 1-based position of the record in the file.
        problem: Why the record cannot be embedded, or None.
    """

    id: str
    description: str
    sequence: str
    position: int
    problem: str | None = None

    def label(self) -> str:
        """Names the record for messages: its id, else its position."""
        if not self.id:
            return f"record #{self.position} (no id)"
        shown = self.id if self.id.isprintable() else repr(self.id)[1:-1]  # no raw control bytes on a terminal
        return f"record #{self.position} '{shown}'"


class RecordHasher:
    """SHA-256 over records as they are read: id, description, sequence and position, length-prefixed.

    The normalised form is hashed (what is embedded), so re-wrapping lines or changing the case of
    residues does not change the hash, while any change of a residue, id or description does.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.records = 0
        self.residues = 0

    def update(self, record: Record) -> None:
        for text in (record.id, record.description, record.sequence):
            data = text.encode("utf-8", "surrogatepass")
            self._hash.update(struct.pack("<Q", len(data)))
            self._hash.update(data)
        self._hash.update(struct.pack("<Q", record.position))
        self.records += 1
        self.residues += len(record.sequence)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def hash_records(records: Iterable[Record]) -> str:
    """The RecordHasher digest of some records."""
    hasher = RecordHasher()
    for record in records:
        hasher.update(record)
    return hasher.hexdigest()
