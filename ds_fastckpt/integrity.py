"""Checks files against their manifest before they are loaded."""

import os
from pathlib import Path
from typing import Optional

from .manifest import FileRecord, Manifest


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint file is missing or differs from its manifest; the message names the file."""


def check_sizes(tag_dir: Path, manifest: Manifest) -> None:
    """Every file of ``manifest`` exists in ``tag_dir`` with its recorded size.

    Raises:
        CheckpointIntegrityError: naming the first file that is missing or has another size.
    """
    for record in manifest.files:
        check_size(tag_dir / record.path, record)


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
