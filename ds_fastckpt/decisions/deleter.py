"""Deletes checkpoint directories rotation chose, and nothing else.

Paranoid on purpose: the directory must be a direct child of save_dir, a real
directory (not a symlink), and still ours (our manifest or our pending/trash
name) at the moment of deletion. It is first renamed to its trash name, so a
crash mid-deletion never leaves a partial directory that looks complete, then
removed with ``Storage.remove_tree``, which unlinks symlinks inside instead
of following them.

One owner per trash directory: a removal handed to a background thread
(``hand_over``) owns its trash name until it ends. ``retire`` waits for it
before it removes or reuses that name (a tag retired again while its last
trash is still being unlinked), so two removals never walk one tree.
"""

import concurrent.futures
import errno
import logging
import os
import threading
from pathlib import Path
from typing import Dict

from ds_fastckpt import storage
from ds_fastckpt.format.atomicity import fsync_dir
from ds_fastckpt.format.names import MANIFEST_NAME, TRASH_SUFFIX, spare_path, tag_of_internal_name, trash_path
from ds_fastckpt.format.records import CheckpointRecord

logger = logging.getLogger(__name__)


# How long ``retire`` waits for a background removal of the trash name it needs.
REMOVAL_WAIT_S = 1800.0

_owners_lock = threading.Lock()
_owners: Dict[str, concurrent.futures.Future] = {}  # absolute trash path -> the background removal owning it


class UnsafeDeletionError(RuntimeError):
    """Refused to delete a path that is not one of our checkpoint directories inside save_dir."""


def hand_over(trash: Path, removal: concurrent.futures.Future) -> None:
    """Records that ``removal`` (a ``remove_retired(trash)`` running elsewhere) owns ``trash`` until it ends."""
    key = os.path.abspath(trash)
    with _owners_lock:
        _owners[key] = removal

    def forget(done, key=key):
        with _owners_lock:
            if _owners.get(key) is done:
                del _owners[key]

    removal.add_done_callback(forget)


def _wait_for_owner(path: Path) -> None:
    """Waits until no background removal owns ``path``; its failure is its owner's to report.

    Raises:
        OSError: EBUSY, naming ``path``, when it is still being removed after ``REMOVAL_WAIT_S``.
    """
    with _owners_lock:
        removal = _owners.get(os.path.abspath(path))
    if removal is None:
        return
    try:
        removal.result(timeout=REMOVAL_WAIT_S)
    except concurrent.futures.TimeoutError:
        raise OSError(errno.EBUSY, f"still being removed in the background after {REMOVAL_WAIT_S} s; not "
                      "touched", str(path)) from None
    except Exception:  # noqa: BLE001  (logged where the removal is tracked; what is left is removed here)
        pass


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

    A trash name still owned by a background removal (``hand_over``) is
    waited for first, never removed beside it.

    Raises:
        UnsafeDeletionError: if the directory is outside save_dir, a symlink, or not ours.
        OSError: from rename, with errno and path; EBUSY when a background removal of the name does not end.
    """
    save_dir = Path(save_dir)
    name = record.name
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafeDeletionError(f"refusing to delete {name!r}: not a directory name inside {save_dir}")
    target = save_dir / name
    _wait_for_owner(target)  # a trash directory chosen again is its background removal's until that ends
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
    _wait_for_owner(trash)
    if backend.exists(trash):
        backend.remove_tree(trash)
    backend.rename(target, trash)
    return trash


def remove_retired(trash: Path) -> None:
    """Removes a retired directory; symlinks inside are unlinked, never followed."""
    storage.storage_for(trash).remove_tree(trash)
    logger.info("deleted checkpoint directory %s", trash)
