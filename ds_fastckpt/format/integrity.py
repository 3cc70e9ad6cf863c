"""Checks files against their manifest before they are loaded."""

import os
import stat
from pathlib import Path
from typing import Optional

from ds_fastckpt.format.manifest import FileRecord, Manifest


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint file is missing or differs from its manifest; the message names the file."""


# torch.save writes a zip archive: a local file header first, the end-of-central-directory record (22 bytes,
# no comment) last. Damage that keeps a file's size (zero-filled, overwritten) rarely keeps both.
_ZIP_HEAD = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"
_ZIP_END_SIZE = 22


def check_files(tag_dir: Path, manifest: Manifest) -> None:
    """Every file of ``manifest`` exists in ``tag_dir`` with its recorded size and a torch.save archive's ends.

    Cheap (a stat and two small reads per file); the CRC-32C check reads everything.

    Raises:
        CheckpointIntegrityError: naming the first file that is missing, has another size, or is no archive.
    """
    for record in manifest.files:
        check_size(tag_dir / record.path, record)
        check_framing(tag_dir / record.path)


def check_framing(path: Path) -> None:
    """``path`` starts and ends the way a torch.save archive does."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO put there must not block the load
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointIntegrityError(f"checkpoint file {path} is not a regular file (a FIFO, device or "
                                           "directory where the manifest lists a file)")
        head = os.pread(fd, len(_ZIP_HEAD), 0)
        tail = os.pread(fd, _ZIP_END_SIZE, max(0, os.fstat(fd).st_size - _ZIP_END_SIZE))
    finally:
        os.close(fd)
    if head != _ZIP_HEAD or not tail.startswith(_ZIP_END):
        raise CheckpointIntegrityError(f"checkpoint file {path} has the size its manifest records but is not a "
                                       "complete torch.save archive (its first or last bytes are wrong: zero-filled "
                                       "or overwritten)")


def check_size(path: Path, record: FileRecord, size: Optional[int] = None) -> None:
    """``path`` has the size ``record`` says; ``size`` is what was read, else the file is stat-ed."""
    if size is None:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CheckpointIntegrityError(f"checkpoint file {path} is missing (the manifest lists it)") from None
    if size != record.bytes:
        raise CheckpointIntegrityError(f"checkpoint file {path} has {size} bytes; the manifest says {record.bytes} "
                                       "(truncated or overwritten)")


def check_checksum(path: Path, record: FileRecord, actual_crc32c: int) -> None:
    if actual_crc32c != record.crc32c:
        raise CheckpointIntegrityError(f"checkpoint file {path} has CRC-32C {actual_crc32c:#010x}; the manifest "
                                       f"says {record.crc32c:#010x} (its content changed after it was written)")
