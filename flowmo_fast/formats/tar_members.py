"""The regular members of an uncompressed tar file, from its headers alone: (name, data offset, size) each, in order.

Python's tarfile builds a TarInfo per header: 66 us of CPU a member of a pax-format shard (webdataset's writer) on
a shared 2-core machine, so a WebDataset of ImageNet's size (2.6M members with the .cls) took three minutes to
index at every start of every process. This walk reads each header with one pread and takes only the name and the
size (15 us a member, 4x less), with tarfile's rules for the formats WebDatasets are written in: ustar (its name
prefix), GNU long names, pax path and size records.
Anything else (a bad checksum, a base-256 size, sparse or Solaris members, a global path, a pax hdrcharset, an
unknown type, a file whose first header is not one) goes to tarfile itself, which then decides: the same members,
errors and truncation, only slower. tests/flowmo_fast/test_tar_members.py holds the two to the same answers.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass

BLOCK = 512
REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
NO_DATA = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE)
PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
PAX_UNUSUAL = re.compile(rb"(^|\n)\d+ (hdrcharset|GNU\.sparse)")  # records that change how tarfile reads on
ENCODING = "utf-8"


class Unusual(Exception):
    """Something this walk leaves to tarfile."""


@dataclass(frozen=True)
class Members:
    regular: list[tuple[str, int, int]]  # (name, offset of the data, size), in the file's order
    truncated: bool  # the file ends inside a member's data (that member is listed; its bytes are short)


def tar_members(path: str) -> Members:
    """The regular members of an uncompressed tar file; raises tarfile.ReadError for a file that is not one."""
    try:
        return walk_headers(path)
    except Unusual:
        return members_by_tarfile(path)


def members_by_tarfile(path: str) -> Members:
    regular, truncated = [], False
    with tarfile.open(path, mode="r:") as tar:
        try:
            for member in tar:
                if member.isreg():
                    regular.append((member.name, member.offset_data, member.size))
        except tarfile.ReadError:  # after the first member only: "unexpected end of data"
            truncated = True
    return Members(regular, truncated)


def walk_headers(path: str) -> Members:
    fd = os.open(path, os.O_RDONLY)
    try:
        end, offset, regular, pending = os.fstat(fd).st_size, 0, [], {}
        while True:
            header = os.pread(fd, BLOCK, offset)
            if len(header) < BLOCK or header.count(0) == BLOCK:  # the end, as tarfile reads it
                if offset == 0:
                    raise Unusual("no first header")
                return Members(regular, truncated=False)
            kind, name, size = parse_header(header)
            if kind == tarfile.AREGTYPE and name.endswith("/"):
                kind = tarfile.DIRTYPE  # the old way of writing a folder, as tarfile reads it
            data = offset + BLOCK
            offset = data if kind in NO_DATA else data + blocks(size)
            if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
                pending.update(long_name(os.pread(fd, size, data)) if kind == tarfile.GNUTYPE_LONGNAME
                               else pax_records(os.pread(fd, size, data)))
            elif kind == tarfile.XGLTYPE:
                if {"path", "size"} & pax_records(os.pread(fd, size, data)).keys():
                    raise Unusual("a global pax path or size")
            elif kind != tarfile.GNUTYPE_LONGLINK:
                if kind in REGULAR:
                    size = pending.get("size", size)
                    offset = data + blocks(size)
                    regular.append((pending.get("path", name), data, size))
                pending = {}
            if offset > end:  # tarfile: "unexpected end of data" before the next header
                return Members(regular, truncated=True)
    finally:
        os.close(fd)


def parse_header(header: bytes) -> tuple[bytes, str, int]:
    """A 512-byte header -> (type, name with its ustar prefix, size); Unusual for what tarfile must read."""
    kind = header[156:157]
    if kind not in (*REGULAR, *NO_DATA, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                    tarfile.XGLTYPE):
        raise Unusual(f"type {kind!r}")
    if header[124] & 0x80 or header[148] & 0x80:
        raise Unusual("a base-256 number")
    try:
        checksum, size = octal(header[148:156]), octal(header[124:136])
    except ValueError:
        raise Unusual("a field that is not octal") from None
    if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # the checksum field counted as spaces
        raise Unusual("a checksum tarfile may take (signed) or refuse")
    name, prefix = text(header[:100]), text(header[345:500])
    if prefix and kind not in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
        name = f"{prefix}/{name}"
    return kind, name, size


def blocks(size: int) -> int:
    """Bytes of `size` bytes of data in the file: whole blocks."""
    return -(-size // BLOCK) * BLOCK


def octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode(ENCODING, "surrogateescape")


def long_name(data: bytes) -> dict:
    return {"path": text(data)}


def pax_records(data: bytes) -> dict:
    """The records "LENGTH KEY=VALUE\\n" of a pax header, as tarfile reads them (path and size used here)."""
    if PAX_UNUSUAL.search(data):
        raise Unusual("a pax hdrcharset or sparse record")
    records, pos = {}, 0
    while match := PAX_RECORD.match(data, pos):
        length, key = int(match.group(1)), match.group(2).decode(ENCODING, "surrogateescape")
        if length == 0:
            raise Unusual("an empty pax record")
        value = data[match.end(2) + 1 : match.start(1) + length - 1].decode(ENCODING, "surrogateescape")
        if key == "size" and not value.isdigit():
            raise Unusual("a pax size that is not a number")
        records[key] = int(value) if key == "size" else value.rstrip("/") if key == "path" else value
        pos += length
    return records
