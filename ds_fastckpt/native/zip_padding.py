"""Where each storage's bytes lie in a ``torch.save`` archive: padded so O_DIRECT can write them from their memory.

``torch.save`` starts every record's data at a multiple of 64 bytes in the
file, padding the record's local header with an extra field (``FB``). A CPU
tensor's memory is aligned to 64 bytes, not to the 512 or 4096 O_DIRECT
needs, so its bytes lie in the file at an offset that disagrees with their
address and must be copied into aligned staging first. ``repad`` gives each
storage record the padding that makes its file offset agree with its address
modulo the writer's memory alignment (at most ``alignment - 1`` more bytes),
and moves the offsets the central directory records to match. Records without
a storage keep torch's own rule.

Such a file is still a plain zip that ``torch.load`` (with ``weights_only``
too), ``zipfile`` and DeepSpeed's tools read: every reader finds a record's
data from its local header. It is no longer byte for byte what ``torch.save``
writes, and its ``.format_version`` record says 0 instead of 1, which tells
``torch.load`` that it cannot compute storage offsets from torch's padding
rule (``torch.utils.serialization.config.load.calculate_storage_offsets``)
and must read them from the headers. When nothing needs to move, the archive
is returned unchanged: byte for byte ``torch.save``'s.

An archive saved with a ``storage_alignment`` other than torch's default
(``torch.utils.serialization.config.save``) keeps its layout: its user asked
for records at those offsets. Only offsets move, never the format: a shift that would carry a local header
or the central directory across the 4 GiB line where zip64 fields appear or
vanish is not made (``repad`` returns None and the file is written as torch
laid it out).
"""

import bisect
import struct
from typing import Callable, List, Optional, Tuple, Union

import torch

Piece = Union[bytes, torch.UntypedStorage, torch.Tensor]

_LOCAL_HEADER = b"PK\x03\x04"
_END = b"PK\x05\x06"
_END64 = b"PK\x06\x06"
_LOCATOR64 = b"PK\x06\x07"
_CENTRAL = b"PK\x01\x02"
_ZIP64_FIELD = 0x0001
_PADDING_FIELD = 0x4246  # "FB", torch's padding field
_ZIP64_MARK = 0xFFFFFFFF  # a 32-bit field whose value lives in the zip64 field
_LOCAL_SIZE, _CENTRAL_SIZE, _END_SIZE, _LOCATOR_SIZE = 30, 46, 22, 20
_TORCH_ALIGNMENT = 64  # torch.save's storage_alignment when the archive does not record one


class _Archive:
    """The archive's bytes as the pieces hold them, readable where they are bytes."""

    def __init__(self, pieces: List[Piece]):
        self.pieces = pieces
        self.starts, offset = [], 0
        for piece in pieces:
            self.starts.append(offset)
            offset += piece_length(piece)
        self.size = offset

    def piece_at(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset) - 1

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, which byte pieces hold; ValueError where a storage does."""
        out = bytearray()
        while len(out) < length:
            index = self.piece_at(offset + len(out))
            piece = self.pieces[index]
            if not isinstance(piece, bytes):
                raise ValueError(f"a zip structure at byte {offset} lies in a storage")
            start = offset + len(out) - self.starts[index]
            out += piece[start:start + length - len(out)]
        return bytes(out)

    def slice(self, begin: int, end: int) -> List[Piece]:
        """The pieces covering ``[begin, end)``: bytes cut to it, a storage only whole."""
        out = []
        for index in range(self.piece_at(begin), len(self.pieces)):
            start = self.starts[index]
            if start >= end:
                break
            piece = self.pieces[index]
            if isinstance(piece, bytes):
                out.append(piece[max(begin - start, 0):end - start])
            elif start < begin or start + piece_length(piece) > end:
                raise ValueError(f"bytes {begin}-{end} of the archive cut a storage")
            else:
                out.append(piece)
        return out


class _Record:
    """One zip record: where its local header and data are, and where the central directory points at it."""

    def __init__(self, archive: _Archive, central_at: int):
        fixed = archive.read(central_at, _CENTRAL_SIZE)
        if fixed[:4] != _CENTRAL:
            raise ValueError(f"no central directory entry at byte {central_at}")
        compressed, self.size, name_length, extra_length, comment_length = struct.unpack_from("<IIHHH", fixed, 20)
        offset = struct.unpack_from("<I", fixed, 42)[0]
        self.name = archive.read(central_at + _CENTRAL_SIZE, name_length)
        self.central_at, self.central_length = central_at, _CENTRAL_SIZE + name_length + extra_length + comment_length
        self.offset_field = central_at + 42  # where the local header's offset is kept, 4 or 8 bytes
        if _ZIP64_MARK in (offset, self.size, compressed):
            # The zip64 field holds, in this order, each of these whose 32-bit field is marked.
            values_at, values = _zip64_values(archive.read(central_at + _CENTRAL_SIZE + name_length, extra_length))
            values_at += central_at + _CENTRAL_SIZE + name_length
            index = 0
            if self.size == _ZIP64_MARK:
                self.size, index = values[0], 1
            if compressed == _ZIP64_MARK:
                index += 1
            if offset == _ZIP64_MARK:
                offset, self.offset_field = values[index], values_at + 8 * index
        self.header_at = offset
        header = archive.read(offset, _LOCAL_SIZE)
        if header[:4] != _LOCAL_HEADER:
            raise ValueError(f"no local header at byte {offset} for {self.name!r}")
        local_name_length, local_extra_length = struct.unpack_from("<HH", header, 26)
        self.fixed = archive.read(offset, _LOCAL_SIZE + local_name_length)
        self.extras = _fields(archive.read(offset + len(self.fixed), local_extra_length))
        if not self.extras or self.extras[-1][0] != _PADDING_FIELD:
            raise ValueError(f"the local header of {self.name!r} does not end with torch's padding field")
        self.data_at = offset + len(self.fixed) + local_extra_length


def repad(pieces: List[Piece], alignment: int, address_of: Callable[[Piece], Optional[int]]) -> Optional[List[Piece]]:
    """The archive in ``pieces`` with each storage record's data at a file offset congruent to its address.

    Args:
        pieces: a ``torch.save`` archive in file order (``Layout.pieces``): bytes, and storages or uint8 tensors
            filling a record's data.
        alignment: the writer's memory alignment (``AioFileWriter.memory_alignment``).
        address_of: a piece's address in memory, or None for one that is copied anyway (an accelerator's).

    Returns:
        The pieces of the re-padded archive; ``pieces`` itself when no record moves; None when a move would change
        which fields are zip64, or the archive is not laid out as torch lays it out.
    """
    try:
        return _repadded(_Archive(pieces), alignment, address_of)
    except (ValueError, struct.error):  # not torch's layout: written as it is
        return None


def _repadded(archive: _Archive, alignment: int, address_of) -> Optional[List[Piece]]:
    records, directory_at, ends = _directory(archive)
    storage_alignment = _storage_alignment(archive, records)
    if storage_alignment != _TORCH_ALIGNMENT:
        return archive.pieces  # a user who asked torch for aligned records gets them (offsets they can compute)
    out: List[Piece] = []
    shift, new_offsets, version_at = 0, [], None
    for index, record in enumerate(records):
        new_header_at = record.header_at + shift
        if _crosses(record.header_at, new_header_at):
            return None
        new_offsets.append(new_header_at)
        extras = [(field, _moved_zip64(data, record.header_at, new_header_at) if field == _ZIP64_FIELD else data)
                  for field, data in record.extras[:-1]]
        before_padding = new_header_at + len(record.fixed) + sum(4 + len(data) for _, data in extras) + 4
        padding = -before_padding % storage_alignment
        data = archive.slice(record.data_at, record.data_at + record.size)
        if len(data) == 1 and not isinstance(data[0], bytes):
            address = address_of(data[0])
            if address is not None:
                padding += (address - before_padding - padding) % alignment
        extras.append((_PADDING_FIELD, b"Z" * padding))
        extra_bytes = b"".join(struct.pack("<HH", field, len(value)) + value for field, value in extras)
        out.append(record.fixed[:28] + struct.pack("<H", len(extra_bytes)) + record.fixed[30:] + extra_bytes)
        if record.name.endswith(b"/.format_version"):
            version_at = len(out)
        out.extend(data)
        shift = before_padding + padding - record.data_at
        following = records[index + 1].header_at if index + 1 < len(records) else directory_at
        out.extend(archive.slice(record.data_at + record.size, following))
    if shift == 0 and all(new == record.header_at for new, record in zip(new_offsets, records)):
        return archive.pieces
    tail = _moved_directory(archive, records, new_offsets, directory_at, ends, shift)
    if tail is None:
        return None
    if version_at is not None and out[version_at] == b"1":
        out[version_at] = b"0"  # torch must read storage offsets from the headers, not compute them
    out.append(tail)
    return out


def _directory(archive: _Archive):
    """The records in file order, where the central directory starts, and the end records' offsets."""
    end_at = archive.size - _END_SIZE
    end = archive.read(end_at, _END_SIZE)
    if end[:4] != _END:
        raise ValueError("the archive does not end with an end-of-central-directory record")
    count, _, directory_at = struct.unpack_from("<HII", end, 10)
    ends = {"end": end_at, "end64": None, "locator": None}
    locator_at = end_at - _LOCATOR_SIZE
    if locator_at >= 0 and archive.read(locator_at, 4) == _LOCATOR64:
        end64_at = struct.unpack_from("<Q", archive.read(locator_at + 8, 8))[0]
        end64 = archive.read(end64_at, 56)
        if end64[:4] != _END64:
            raise ValueError("the zip64 locator points at no zip64 end record")
        count, _, directory_at = struct.unpack_from("<QQQ", end64, 32)
        ends.update(end64=end64_at, locator=locator_at)
    records, position = [], directory_at
    for _ in range(count):
        records.append(_Record(archive, position))
        position += records[-1].central_length
    records.sort(key=lambda record: record.header_at)
    return records, directory_at, ends


def _moved_directory(archive: _Archive, records: List[_Record], new_offsets: List[int], directory_at: int,
                     ends: dict, shift: int) -> Optional[bytes]:
    """The central directory and end records with every offset moved, or None where a move changes the format."""
    tail = bytearray(archive.read(directory_at, archive.size - directory_at))
    if _crosses(directory_at, directory_at + shift):
        return None
    for record, new_offset in zip(records, new_offsets):
        at = record.offset_field - directory_at
        if record.offset_field == record.central_at + 42:
            struct.pack_into("<I", tail, at, new_offset)
        else:
            struct.pack_into("<Q", tail, at, new_offset)
    if ends["end64"] is not None:
        struct.pack_into("<Q", tail, ends["end64"] - directory_at + 48, directory_at + shift)
        struct.pack_into("<Q", tail, ends["locator"] - directory_at + 8, ends["end64"] + shift)
    end_offset = ends["end"] - directory_at + 16
    if struct.unpack_from("<I", tail, end_offset)[0] != _ZIP64_MARK:
        struct.pack_into("<I", tail, end_offset, directory_at + shift)
    return bytes(tail)


def _storage_alignment(archive: _Archive, records: List[_Record]) -> int:
    """The alignment torch padded records to: its ``.storage_alignment`` record, else its default."""
    for record in records:
        if record.name.endswith(b"/.storage_alignment"):
            return int(archive.read(record.data_at, record.size))
    return _TORCH_ALIGNMENT


def _crosses(old: int, new: int) -> bool:
    """Whether moving an offset from ``old`` to ``new`` changes whether zip64 must hold it."""
    return (old >= _ZIP64_MARK) != (new >= _ZIP64_MARK)


def _fields(extra: bytes) -> List[tuple]:
    fields, position = [], 0
    while position < len(extra):
        field, length = struct.unpack_from("<HH", extra, position)
        fields.append((field, extra[position + 4:position + 4 + length]))
        position += 4 + length
    if position != len(extra):
        raise ValueError("a local header's extra fields overrun it")
    return fields


def _zip64_values(extra: bytes) -> Tuple[int, List[int]]:
    """Where the zip64 field's values start in ``extra``, and the values."""
    position = 0
    for field, data in _fields(extra):
        if field == _ZIP64_FIELD:
            return position + 4, list(struct.unpack(f"<{len(data) // 8}Q", data[:len(data) // 8 * 8]))
        position += 4 + len(data)
    raise ValueError("a central directory entry marks zip64 values but has no zip64 field")


def _moved_zip64(data: bytes, old_offset: int, new_offset: int) -> bytes:
    """A local header's zip64 field with its own offset moved: miniz puts the offset there, last, past 4 GiB."""
    if old_offset < _ZIP64_MARK:
        return data
    if len(data) < 8 or struct.unpack_from("<Q", data, len(data) - 8)[0] != old_offset:
        raise ValueError("a local header's zip64 field does not end with its own offset")
    return data[:-8] + struct.pack("<Q", new_offset)


def piece_length(piece: Piece) -> int:
    """Bytes a piece of an archive takes in the file: bytes, a storage, or a uint8 tensor (a snapshot's copy)."""
    if isinstance(piece, bytes):
        return len(piece)
    return piece.nbytes() if isinstance(piece, torch.UntypedStorage) else piece.numel()
