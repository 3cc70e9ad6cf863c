"""The records of a zip archive as a reader finds them: each name's data, from the offset its local header gives."""

import io
import struct
import zipfile
from typing import Dict, Tuple

DIRECT_ALIGNMENT = 4096


def records(archive: bytes) -> Dict[str, Tuple[int, bytes]]:
    """``name -> (data offset, data)`` of every record; zipfile parses the central directory (it checks no CRC
    here: torch writes none with its CRC32 off)."""
    found = {}
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        for info in opened.infolist():
            header = archive[info.header_offset:info.header_offset + 30]
            assert header[:4] == b"PK\x03\x04", info.filename
            name_length, extra_length = struct.unpack_from("<HH", header, 26)
            start = info.header_offset + 30 + name_length + extra_length
            found[info.filename] = (start, archive[start:start + info.file_size])
    return found


def same_records(written: bytes, expected: bytes) -> bool:
    try:
        assert_same_records(written, expected)
    except AssertionError:
        return False
    return True


def assert_same_records(written: bytes, expected: bytes) -> None:
    """``written`` holds ``expected``'s records, in its order, with the same data; only padding, the offsets that
    follow from it, and ``.format_version`` (0 once padding moved) may differ."""
    mine, theirs = records(written), records(expected)
    assert list(mine) == list(theirs)
    moved = written != expected
    for name, (_, data) in theirs.items():
        if name.endswith("/.format_version") and moved:
            assert mine[name][1] == b"0", "a re-padded archive must not let torch compute offsets"
        else:
            assert mine[name][1] == data, name
