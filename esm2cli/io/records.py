"""One FASTA record as read and normalised, and the hash of records as they stream by."""

from __future__ import annotations

import hashlib
import struct
from array import array
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

    Each record's bytes also get a short digest of their own (``keep_digests``), kept in file order, so that
    the chunks of a resumable run are identified from the same pass (``chunk_digest``): a run hashes its
    records once, in its check pass, not again chunk by chunk.
    """

    def __init__(self, keep_digests: bool = False) -> None:
        self._hash = hashlib.sha256()
        self.records = 0
        self.residues = 0
        self.digests: array[int] | None = array("Q") if keep_digests else None  # 8 bytes a record

    def update(self, record: Record) -> None:
        parts = []
        for text in (record.id, record.description, record.sequence):
            data = text.encode("utf-8", "surrogatepass")
            parts += [struct.pack("<Q", len(data)), data]
        parts.append(struct.pack("<Q", record.position))
        data = b"".join(parts)
        self._hash.update(data)
        if self.digests is not None:
            self.digests.append(int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little"))
        self.records += 1
        self.residues += len(record.sequence)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def chunk_digest(digests: array[int], start: int, stop: int) -> str:
    """The identity of the records at 0-based indices start..stop-1, from their digests (see RecordHasher)."""
    if stop > len(digests):
        raise ValueError(f"a chunk up to record {stop} of an input of {len(digests)} records; this is a bug")
    return hashlib.sha256(struct.pack("<QQ", start, stop) + digests[start:stop].tobytes()).hexdigest()


def hash_records(records: Iterable[Record]) -> str:
    """The RecordHasher digest of some records."""
    hasher = RecordHasher()
    for record in records:
        hasher.update(record)
    return hasher.hexdigest()
