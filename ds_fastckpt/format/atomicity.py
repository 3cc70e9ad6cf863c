"""Durable, all-or-nothing changes to the checkpoint directory: tmp + fsync + rename + fsync of the directory.

A checkpoint is written into a pending directory ``.<tag>.ds_fastckpt-tmp``
beside its final place and renamed to ``<tag>`` once its manifest is durable,
so ``<tag>`` either does not exist or is complete. Directories being deleted
are first renamed to ``.<tag>.ds_fastckpt-trash``. Both names mark a
directory as ours, so an interrupted save or deletion can be cleaned up later
without touching anything else.
"""

import ctypes
import logging
import os
import secrets
from pathlib import Path
from typing import Optional

from ds_fastckpt.format.names import PENDING_SUFFIX

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_dir(path: Path) -> None:
    """Makes the entries of ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd, path)
    finally:
        os.close(fd)


def _fsync(fd: int, path: Path) -> None:
    """os.fsync, with the path in its error (fsync's own names no file). Never retried: after a failed
    fsync the kernel may have dropped the dirty pages, so a second call can succeed with the data lost."""
    try:
        os.fsync(fd)
    except OSError as error:
        raise OSError(error.errno, f"{error.strerror} (fsync)", str(path)) from None


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Replaces ``path`` with ``data`` so that readers see the old or the new content, never a mix.

    The content goes to a new file of a unique name, created with
    ``O_EXCL | O_NOFOLLOW``: a symlink or file another user planted in a
    shared save_dir under a name we use is never followed, truncated or
    written. The rename replaces whatever entry ``path`` is (a symlink
    itself, not its target).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{PENDING_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                _fsync(fd, tmp)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # ours; `path` keeps its old content
        raise
    if fsync:
        fsync_dir(path.parent)


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
    exchanged = os.path.lexists(final)
    if exchanged:
        _exchange(pending, final)
    else:
        os.rename(pending, final)
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
            os.rename(final, pending)
    except OSError as error:
        logger.error("could not undo the publication of %s after its commit failed: %s", final, error)


def _exchange(first: Path, second: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{os.strerror(err)} (renameat2 RENAME_EXCHANGE with {first})", str(second))

