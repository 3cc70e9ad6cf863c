"""Deletes checkpoint directories rotation chose, and nothing else.

Paranoid on purpose: the directory must be a direct child of save_dir, a real
directory (not a symlink), and still ours (our manifest or our pending/trash
name) at the moment of deletion. It is first renamed to its trash name, so a
crash mid-deletion never leaves a partial directory that looks complete, then
removed with ``Storage.remove_tree``, which unlinks symlinks inside instead
of following them.
"""

import errno
import logging
import os
from pathlib import Path

from ds_fastckpt import storage
from ds_fastckpt.format.atomicity import fsync_dir
from ds_fastckpt.format.names import MANIFEST_NAME, TRASH_SUFFIX, spare_path, tag_of_internal_name, trash_path
from ds_fastckpt.format.records import CheckpointRecord

logger = logging.getLogger(__name__)


class UnsafeDeletionError(RuntimeError):
    """Refused to delete a path that is not one of our checkpoint directories inside save_dir."""


def delete_checkpoint(save_dir, record: CheckpointRecord) -> None:
    """Deletes ``record``'s directory from ``save_dir``: ``retire`` then ``remove_retired``.

    Raises:
        UnsafeDeletionError: if the directory is outside save_dir, a symlink, or not ours.
        OSError: from rename or unlink, with errno and path.
    """
    trash = retire(save_dir, record)
    fsync_dir(Path(save_dir))
    remove_retired(trash)


def retire(save_dir, record: CheckpointRecord, *, as_spare: bool = False) -> Path:
    """Checks that ``record``'s directory may be deleted and renames it to its trash name; returns that path.

    With ``as_spare`` the name is its spare name instead: the next save
    writes over its files (``Storage.take_for_overwrite``) and the rotation
    after that removes what is left.

    After this the checkpoint no longer counts as complete. fsync save_dir
    before removing files, so no unlink can reach the disk before the rename
    does on filesystems that do not order them. Removing the files
    can take long (unlinking 100 MB took 95 ms here), so it is a separate step
    the caller may run later or on another thread.

    Raises:
        UnsafeDeletionError: if the directory is outside save_dir, a symlink, or not ours.
        OSError: from rename, with errno and path.
    """
    save_dir = Path(save_dir)
    name = record.name
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafeDeletionError(f"refusing to delete {name!r}: not a directory name inside {save_dir}")
    target = save_dir / name
    backend = storage.storage_for(save_dir)
    kind = backend.entry_kind(target)
    if kind is None:  # gone since the scan: the same error the lstat of the check gave
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(target))
    if kind is not storage.EntryKind.DIRECTORY:
        raise UnsafeDeletionError(f"refusing to delete {target}: it is not a real directory (symlink or file)")
    internal = tag_of_internal_name(name) is not None
    if not internal and backend.entry_kind(target / MANIFEST_NAME) is not storage.EntryKind.FILE:
        raise UnsafeDeletionError(f"refusing to delete {target}: it has no ds_fastckpt manifest")
    if name.endswith(TRASH_SUFFIX) and not as_spare:
        return target
    trash = (spare_path if as_spare else trash_path)(save_dir, record.tag)
    if backend.exists(trash):
        backend.remove_tree(trash)
    backend.rename(target, trash)
    return trash


def remove_retired(trash: Path) -> None:
    """Removes a retired directory; symlinks inside are unlinked, never followed."""
    storage.storage_for(trash).remove_tree(trash)
    logger.info("deleted checkpoint directory %s", trash)
