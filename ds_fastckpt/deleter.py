"""Deletes checkpoint directories rotation chose, and nothing else.

Paranoid on purpose: the directory must be a direct child of save_dir, a real
directory (not a symlink), and still ours (our manifest or our pending/trash
name) at the moment of deletion. It is first renamed to its trash name, so a
crash mid-deletion never leaves a partial directory that looks complete, then
removed with ``shutil.rmtree``, which unlinks symlinks inside instead of
following them.
"""

import logging
import os
import shutil
import stat
from pathlib import Path

from .atomicity import TRASH_SUFFIX, fsync_dir, tag_of_internal_name, trash_path
from .manifest import MANIFEST_NAME
from .records import CheckpointRecord

logger = logging.getLogger(__name__)


class UnsafeDeletionError(RuntimeError):
    """Refused to delete a path that is not one of our checkpoint directories inside save_dir."""


def delete_checkpoint(save_dir, record: CheckpointRecord, fsync: bool = True) -> None:
    """Deletes ``record``'s directory from ``save_dir``.

    Raises:
        UnsafeDeletionError: if the directory is outside save_dir, a symlink, or not ours.
        OSError: from rename or unlink, with errno and path.
    """
    save_dir = Path(save_dir)
    name = record.name
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafeDeletionError(f"refusing to delete {name!r}: not a directory name inside {save_dir}")
    target = save_dir / name
    mode = os.lstat(target).st_mode
    if not stat.S_ISDIR(mode):
        raise UnsafeDeletionError(f"refusing to delete {target}: it is not a real directory (symlink or file)")
    internal = tag_of_internal_name(name) is not None
    if not internal and not stat.S_ISREG(_lstat_mode(target / MANIFEST_NAME)):
        raise UnsafeDeletionError(f"refusing to delete {target}: it has no ds_fastckpt manifest")
    if not name.endswith(TRASH_SUFFIX):
        trash = trash_path(save_dir, record.tag)
        if os.path.lexists(trash):
            shutil.rmtree(trash)
        os.rename(target, trash)
        if fsync:
            fsync_dir(save_dir)
        target = trash
    shutil.rmtree(target)
    logger.info("deleted checkpoint directory %s", save_dir / name)


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0
