"""Durable, all-or-nothing changes to the checkpoint directory: tmp + fsync + rename + fsync of the directory.

A checkpoint is written into a pending directory ``.<tag>.ds_fastckpt-tmp``
beside its final place and renamed to ``<tag>`` once its manifest is durable,
so ``<tag>`` either does not exist or is complete. Directories being deleted
are first renamed to ``.<tag>.ds_fastckpt-trash``. Both names mark a
directory as ours, so an interrupted save or deletion can be cleaned up later
without touching anything else.

The syscalls behind each step are the storage backend's
(``ds_fastckpt.storage``); this module decides the steps and their order.
"""

import logging
import secrets
from pathlib import Path
from typing import Optional

from ds_fastckpt import storage
from ds_fastckpt.format.names import PENDING_SUFFIX

logger = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Makes the entries of ``path`` (creations, renames, unlinks) durable.

    Raises:
        OSError: with errno and ``path``; never retried (see ``Storage.sync_dir``).
    """
    storage.storage_for(path).sync_dir(path)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Replaces ``path`` with ``data`` so that readers see the old or the new content, never a mix.

    The content goes to a new file of a unique name, created exclusively
    (``Storage.write_atomic``): a symlink or file another user planted in a
    shared save_dir under a name we use is never followed, truncated or
    written. The rename replaces whatever entry ``path`` is (a symlink
    itself, not its target).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{PENDING_SUFFIX}")
    storage.storage_for(path).write_atomic(path, data, tmp, fsync=fsync)


def publish_dir(pending: Path, final: Path, fsync: bool = True) -> Optional[Path]:
    """Renames a complete ``pending`` directory to ``final`` in one step.

    When ``final`` already exists (a tag saved again) the two are exchanged
    atomically, so ``final`` is never missing; the old directory then sits at
    the pending name and is returned for the caller to delete. When the fsync
    of the parent directory fails, the rename is undone before the error is
    raised: a checkpoint whose commit raised must not be what resumes.

    Raises:
        OSError: from rename/renameat2 or fsync, with errno and path.
    """
    backend = storage.storage_for(final)
    exchanged = backend.exists(final)
    if exchanged:
        _exchange(pending, final)
    else:
        backend.rename(pending, final)
    if fsync:
        try:
            fsync_dir(final.parent)
        except OSError:
            undo_publish(pending, final, exchanged)
            raise
    return pending if exchanged else None


def undo_publish(pending: Path, final: Path, exchanged: bool) -> None:
    """Puts ``final`` back at ``pending`` and, if it replaced a directory, that one back at ``final``.

    For a commit that failed after its rename. Best effort: the error that
    failed the commit is the one to report, so a failure here is logged.
    """
    try:
        if exchanged:
            _exchange(pending, final)
        else:
            storage.storage_for(final).rename(final, pending)
    except OSError as error:
        logger.error("could not undo the publication of %s after its commit failed: %s", final, error)


def _exchange(first: Path, second: Path) -> None:
    """The one exchange of publish and undo (tests replace it to make the exchange fail)."""
    storage.storage_for(second).exchange(first, second)

