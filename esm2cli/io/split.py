"""Shards of an input by byte range: a shard owns the records whose '>' lies in its slice of the file.

Shard i of n owns bytes [i*size/n, (i+1)*size/n). It reads from its start, skips to the first '>' that opens a
line, and reads past its end only to finish the record it is in (Hadoop's LineRecordReader does the same for
lines). Every record is in exactly one shard, a record longer than a whole slice too, and a shard reads its slice
plus at most one record and one read-ahead block, whatever the size of the file.

A BGZF file (bgzip, Biopython's Bio.bgzf) is split the same way on its blocks: each block is a gzip member that
announces its size, so the first block at or after an offset is found by looking for a header whose size leads to
the next header. A record belongs to the shard whose slice holds the start of the block its '>' is in. Plain gzip
cannot be split: it is read whole (see ``detect_format``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from esm2cli.config import ShardConfig
from esm2cli.errors import FastaError, StorageError
from esm2cli.io.fasta import read_records
from esm2cli.io.records import Record
from esm2cli.io.storage import file_stamp, is_stream, is_url, open_input

log = logging.getLogger(__name__)

READ_BLOCK = 256 << 10  # bytes a read asks for: a shard reads at most this much past what it needs
_FIRST_READ_PAST = 4 << 10
_BGZF_MAX_BLOCK = 1 << 16  # BSIZE is 16 bits: no block is larger
_BGZF_HEADER = b"\x1f\x8b\x08\x04"  # gzip magic, deflate, FEXTRA set
_GZIP_MAGIC = b"\x1f\x8b"
# The empty block bgzip ends a file with (SAM/BAM spec 4.1.2): a file without it was cut short.
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
# The byte "before" a slice that starts at byte 0 in a shard other than 0 (more shards than bytes): it opens no
# line, so only shard 0 owns the first record (and a byte-order mark before it).
_NOT_FILE_START = b"\0"

Piece = tuple[bytes, bool]  # bytes of the (decompressed) text, and whether they lie in the shard's slice


def bgzf_block_size(data: bytes, at: int = 0) -> int | None:
    """The size of the BGZF block whose header starts at ``data[at]``, from its 'BC' extra field; None if none is."""
    if data[at : at + 4] != _BGZF_HEADER or len(data) < at + 12:
        return None
    xlen = int.from_bytes(data[at + 10 : at + 12], "little")
    pos, end = at + 12, min(at + 12 + xlen, len(data))
    while pos + 4 <= end:
        tag, length = data[pos : pos + 2], int.from_bytes(data[pos + 2 : pos + 4], "little")
        if tag == b"BC" and length == 2 and pos + 6 <= end:
            return int.from_bytes(data[pos + 4 : pos + 6], "little") + 1
        pos += 4 + length
    return None


def detect_format(head: bytes) -> str:
    """'bgzf', 'gzip' or 'plain', from a file's first bytes (never from its name)."""
    if head[:2] != _GZIP_MAGIC:
        return "plain"
    return "bgzf" if bgzf_block_size(head) is not None else "gzip"


@dataclass(frozen=True)
class InputSlice:
    """What one shard reads of its input.

    Attributes:
        path: What to parse: the input itself (a local plain file), or a local copy of the shard's records.
        span: The bytes of ``path`` that hold the shard's records, [start, stop) (None: all of ``path``).
        range: The shard's slice of the input, [start, stop) in the file's own (for BGZF, compressed) bytes.
        size: The input's size in bytes.
        stamp: The input's modification time (ns) or, on an object store, its ETag.
        format: "plain" or "bgzf".
        bytes_read: Bytes this shard read of the input to find its records.
    """

    path: str
    span: tuple[int, int] | None
    range: tuple[int, int]
    size: int
    stamp: str
    format: str
    bytes_read: int

    def identity(self) -> dict:
        """The slice in the run identity: a shard is the same work only for the same bytes of the same file."""
        return {"bytes": list(self.range), "size": self.size, "stamp": self.stamp, "format": self.format}


def slice_range(size: int, index: int, count: int) -> tuple[int, int]:
    """Shard ``index`` of ``count``'s bytes [start, stop): contiguous, complete, disjoint."""
    return index * size // count, (index + 1) * size // count


class _Counted:
    """A binary handle that counts the bytes it returns."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.count = 0

    def read_at(self, offset: int, size: int) -> bytes:
        self.handle.seek(offset)
        return self.read(size)

    def read(self, size: int) -> bytes:
        data = self.handle.read(size)
        self.count += len(data)
        return data


def _line_start(data: bytes, before: bytes) -> int | None:
    """The index of the first '>' in ``data`` that opens a line (``before``: the byte preceding ``data``)."""
    at = data.find(b">")
    while at >= 0:
        if (data[at - 1 : at] if at else before) == b"\n":
            return at
        at = data.find(b">", at + 1)
    return None


def own_records(pieces: Iterator[Piece], before: bytes, emit: Callable[[bytes], object] | None = None,
                ) -> tuple[int, int] | None:  # fmt: skip
    """Finds the records that start in the slice: from the first '>' opening a line in a piece of the slice,
    up to the first '>' opening a line after the slice.

    Args:
        pieces: The text from the slice's start on, each piece marked as inside the slice or past it.
        before: The byte before the first piece; b"" at the start of the file, whose leading bytes are the
            first slice's own (a byte-order mark, blank lines).
        emit: Given those records' bytes, in order.

    Returns:
        Where the records begin and end, as offsets into the pieces' text; None for an empty shard.
    """
    copying = before == b""
    offset, first = 0, 0
    for data, inside in pieces:
        if not data:
            continue
        if not copying:
            if not inside:
                return None  # no record starts in the slice
            at = _line_start(data, before)
            before = data[-1:]
            if at is None:
                offset += len(data)
                continue
            copying, first, offset, data = True, offset + at, offset + at, data[at:]
        elif not inside and (at := _line_start(data, before)) is not None:
            if emit:
                emit(data[:at])
            return first, offset + at
        before = data[-1:]
        if emit:
            emit(data)
        offset += len(data)
    return (first, offset) if copying else None


def _plain_pieces(source: _Counted, start: int, stop: int, size: int) -> Iterator[Piece]:
    offset, past = start, _FIRST_READ_PAST
    while offset < size:
        if offset < stop:
            want = min(READ_BLOCK, stop - offset)
        else:  # the rest of one record: most are short, so the reads past the slice start small
            want, past = past, min(2 * past, READ_BLOCK)
        data = source.read_at(offset, want)
        if not data:
            return
        yield data, offset < stop
        offset += len(data)


def _plain_before(source: _Counted, start: int, index: int) -> bytes:
    if start == 0:
        return b"" if index == 0 else _NOT_FILE_START
    return source.read_at(start - 1, 1)


def _is_block(source: _Counted, at: int, size: int, header: bytes) -> bool:
    """A BGZF header at ``at`` whose size leads to the end of the file or to another header."""
    length = bgzf_block_size(header)
    if length is None or at + length > size:
        return False
    return at + length == size or bgzf_block_size(source.read_at(at + length, 18)) is not None


def _next_block(source: _Counted, offset: int, size: int) -> int:
    """The start of the first BGZF block at or after ``offset`` (``size`` when there is none)."""
    if offset == 0:
        return 0
    position = offset
    while position < size:
        window = source.read_at(position, _BGZF_MAX_BLOCK + 17)  # a header starts in any 64 KiB
        at = window.find(_BGZF_HEADER)
        while 0 <= at < _BGZF_MAX_BLOCK:
            if _is_block(source, position + at, size, window[at : at + 18]):
                return position + at
            at = window.find(_BGZF_HEADER, at + 1)
        position += _BGZF_MAX_BLOCK
    return size


def _inflate(block: bytes, where: str) -> bytes:
    try:
        return zlib.decompress(block, wbits=31)
    except zlib.error as exc:
        raise FastaError(f"{where}: a BGZF block cannot be decompressed ({exc})") from exc


def _bgzf_before(source: _Counted, first: int, size: int, where: str, index: int = 0) -> bytes:
    """The last byte of text before the block at ``first`` (b"" at the start of the file, for shard 0)."""
    if first == 0:
        return b"" if index == 0 else _NOT_FILE_START
    begin = max(0, first - _BGZF_MAX_BLOCK)
    window = source.read_at(begin, first - begin)
    at = window.find(_BGZF_HEADER)
    while at >= 0:
        if bgzf_block_size(window, at) == len(window) - at:
            text = _inflate(window[at:], where)
            if text:
                return text[-1:]
            return _bgzf_before(source, begin + at, size, where)  # an empty block: look one further back
        at = window.find(_BGZF_HEADER, at + 1)
    raise FastaError(f"{where}: no BGZF block ends at byte {first}; the file is not BGZF throughout")


def _bgzf_pieces(source: _Counted, first: int, stop: int, size: int, where: str) -> Iterator[Piece]:
    offset = first
    while offset < size:
        length = bgzf_block_size(source.read_at(offset, 18))
        if length is None:
            raise FastaError(f"{where}: no BGZF block at byte {offset}; the file is not BGZF throughout")
        block = source.read_at(offset, length)
        yield _inflate(block, where), offset < stop
        offset += length


@contextmanager
def open_slice(source: str, index: int, count: int, fmt: str, *, stamp: str | None = None) -> Iterator[InputSlice]:
    """The records of shard ``index`` of ``count`` of a plain or BGZF FASTA (local or any fsspec URL).

    A local plain file is parsed in place; a URL's slice, and a BGZF slice decompressed, are copied once to a
    local temporary file (deleted on exit), so that the check pass and the embed pass read the input once.

    Args:
        source: A path or URL.
        index, count: The shard.
        fmt: "plain" or "bgzf" (see detect_format).
        stamp: What identifies this version of the input (default: its modification time or ETag).

    Raises:
        FastaError: The file cannot be read, or a BGZF file holds a block that is not BGZF.
    """
    try:
        found = file_stamp(source)
    except StorageError as exc:
        raise FastaError(str(exc)) from exc
    size = int(found["size"])
    version = stamp if stamp is not None else str(found["modified"])
    start, stop = slice_range(size, index, count)
    if fmt == "plain" and not is_url(source):
        with _opened(source) as counted:
            bounds = _find_bounds(counted, start, stop, size, index)
        yield InputSlice(source, bounds, (start, stop), size, version, fmt, counted.count)
        return
    with _local_copy() as (path, out):
        with _opened(source) as counted:
            if fmt == "plain":
                before = _plain_before(counted, start, index)
                own_records(_plain_pieces(counted, start, stop, size), before, out.write)
            else:
                first = _next_block(counted, start, size)
                before = _bgzf_before(counted, first, size, source, index)
                own_records(_bgzf_pieces(counted, first, stop, size, source), before, out.write)
        out.close()
        yield InputSlice(path, None, (start, stop), size, version, fmt, counted.count)


@contextmanager
def _opened(source: str) -> Iterator[_Counted]:
    """The input with no read-ahead of the filesystem's own (s3fs reads 50 MB blocks by default)."""
    try:
        with open_input(source, ranged=True) as raw:
            yield _Counted(raw)
    except StorageError as exc:
        raise FastaError(str(exc)) from exc


def _find_bounds(source: _Counted, start: int, stop: int, size: int, index: int) -> tuple[int, int]:
    """Where a local plain file's records of shard ``index``'s slice [start, stop) begin and end."""
    found = own_records(_plain_pieces(source, start, stop, size), _plain_before(source, start, index))
    return (start + found[0], start + found[1]) if found else (stop, stop)


@contextmanager
def _local_copy() -> Iterator[tuple[str, BinaryIO]]:
    fd, path = tempfile.mkstemp(prefix="esm2cli-shard-", suffix=".fasta")
    out = os.fdopen(fd, "wb")
    try:
        yield path, out
    finally:
        out.close()
        os.unlink(path)


@dataclass(frozen=True)
class InputSource:
    """Where a run reads its records: the input as named, and the file (and bytes of it) that hold them.

    Attributes:
        name: The input as given (messages, metadata).
        path: What to parse: the input, a spooled copy of a stream (stdin, a FIFO), or a local copy of a shard's
            records.
        span: Bytes [start, stop) of ``path`` (a shard of a local plain file); None: all of it.
        slice: The shard's byte range, when the input was split by bytes; None: every record is read
            (no shard, or a plain gzip that cannot be split).
    """

    name: str
    path: str
    span: tuple[int, int] | None = None
    slice: InputSlice | None = None

    def records(self, max_length: int | None = None) -> Iterator[Record]:
        """The records of this source, in file order (see esm2cli.io.fasta.read_records)."""
        return read_records(self.path, max_length, self.span)


def sniff_format(source: str) -> str:
    """'plain', 'bgzf' or 'gzip', from the first bytes of a file (see detect_format).

    Raises:
        FastaError: The file cannot be read.
    """
    with _opened(source) as counted:
        return detect_format(counted.read(18))


def check_bgzf_end(source: str, name: str) -> None:
    """Refuses a BGZF file that does not end with bgzip's end-of-file block: it was cut short (a bgzip or a
    copy stopped mid-way), and its last record would be read with part of its sequence.

    Raises:
        FastaError: The file cannot be read or lacks the end-of-file block.
    """
    try:
        size = int(file_stamp(source)["size"])
    except StorageError as exc:
        raise FastaError(str(exc)) from exc
    with _opened(source) as counted:
        tail = counted.read_at(max(0, size - len(BGZF_EOF)), len(BGZF_EOF))
    if tail != BGZF_EOF:
        raise FastaError(
            f"{name}: BGZF without its end-of-file block: the file was cut short (a bgzip or a copy stopped "
            "mid-way); recreate it"
        )


def _content_stamp(path: str) -> str:
    """The stamp of a spooled copy of a stream: its content, since its copy's modification time is new each run."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


@contextmanager
def shard_source(path: str, name: str, shard: ShardConfig | None) -> Iterator[InputSource]:
    """The source of a run: the whole input, or shard ``shard``'s byte range of it.

    A plain gzip cannot be split: it is read whole, as by a run without shards, after one warning that says
    what that costs and how to avoid it. A BGZF file cut short (no end-of-file block) is refused, sharded or not.
    """
    if shard is None:
        if (is_url(path) or os.path.isfile(path)) and sniff_format(path) == "bgzf":  # a pipe is read once only
            check_bgzf_end(path, name)
        yield InputSource(name, path)
        return
    fmt = sniff_format(path)
    if fmt == "bgzf":
        check_bgzf_end(path, name)
    if fmt == "gzip":
        size = int(file_stamp(path)["size"])
        log.warning(
            "%s is plain gzip, which cannot be split: each of the %d shards reads and decompresses all of it "
            "(%.1f MB) to find its records; recompress it with bgzip (htslib), or store it uncompressed, so "
            "that each shard reads only its slice",
            name, shard.count, size / 1e6,
        )  # fmt: skip
        yield InputSource(name, path)
        return
    # A stream (stdin, a FIFO, <(zcat x.gz)) was spooled: the same bytes piped to every shard are the same input.
    stamp = _content_stamp(path) if is_stream(name) else None
    with open_slice(path, shard.index, shard.count, fmt, stamp=stamp) as piece:
        log.info(
            "shard %d of %d: bytes %d..%d of %s (%s, %d bytes; %d read to find its records)",
            shard.index, shard.count, piece.range[0], piece.range[1], name, fmt, piece.size, piece.bytes_read,
        )  # fmt: skip
        yield InputSource(name, piece.path, piece.span, piece)
