"""Downloading a remote checkpoint into a local pending directory, every file checked against its manifest.

The manifest was validated when the catalog read it (paths stay inside the
tag directory, sizes and CRC-32C are well formed); each file is refused
before a byte is written when its object's size differs, and after when its
CRC-32C does (``ObjectStore.download_file``). What lands locally is then
committed as any save is (``engine.remote_resume``), and loaded through the
same verified, safe unpickling as a local checkpoint.
"""

import logging
import time
from pathlib import Path
from typing import Sequence

from ds_fastckpt import storage
from ds_fastckpt.format.manifest import FileRecord, Manifest
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.store import ObjectStore

logger = logging.getLogger(__name__)


def share_of(manifest: Manifest, index: int, count: int) -> Sequence[FileRecord]:
    """The files one of ``count`` downloaders fetches: every ``count``-th, largest first, so shares even out."""
    files = sorted(manifest.files, key=lambda record: (-record.bytes, record.path))
    return files[index::count]


def download_files(store: ObjectStore, tag: str, records: Sequence[FileRecord], pending: Path) -> int:
    """Downloads ``records`` of ``tag`` into ``pending`` (which exists), each checked; returns the bytes fetched.

    Raises:
        RemoteIntegrityError, RemoteUnavailableError, FileNotFoundError (an object that is gone), OSError.
    """
    started, total = time.monotonic(), 0
    backend = storage.storage_for(pending)
    for record in records:
        target = pending / record.path
        if target.parent != pending:
            backend.make_dir(target.parent, parents=True, exist_ok=True)
        store.download_file(layout.file_key(tag, record.path), target, size=record.bytes, crc32c=record.crc32c)
        total += record.bytes
    if records:
        logger.info("downloaded %d file(s), %d bytes of checkpoint %r from %s in %.1f s", len(records), total, tag,
                    store.describe(), time.monotonic() - started)
    return total
