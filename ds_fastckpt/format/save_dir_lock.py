"""One job per save_dir: an exclusive ``flock`` on ``save_dir/.ds_fastckpt.lock``, held while the job saves there.

Two jobs saving into one directory would rotate each other's checkpoints
away. The storage leader takes the lock at its first save into a directory
and keeps it until it saves into another directory, ``engine.destroy()`` or
the process ends: an engine holds one lock at a time, so a client that saves
every checkpoint into a new directory (the Hugging Face Trainer's
``checkpoint-N``) holds one descriptor, not one per directory. The kernel
drops a ``flock`` when its holder dies, so a crashed job never leaves a stale
lock. Engines of one process share the lock (re-creating an engine to resume
is common). A process forked from the holder (a data-loader worker) closes its
copy at once, so it never keeps the lock alive after the job dies. Each save
re-checks that the lock file is still the inode it locked: one removed or
replaced under a running job is locked again, or the save is refused if
another job got there first. ``flock`` is per host: on a filesystem shared by
several hosts (NFS) it does not see the other hosts. Opening, locking and
checking the file are the storage backend's (``Storage.lock_exclusive``).
"""

import contextlib
import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ds_fastckpt import storage
from ds_fastckpt.format.names import LOCK_NAME

_held: Dict[str, Tuple[storage.FileLock, int]] = {}  # realpath of save_dir -> (lock, holders in this process)
_mutex = threading.Lock()


class SaveDirLockedError(OSError):
    """Another job is saving into this save_dir; the message says which (pid, host, since when)."""


def lock_path(save_dir) -> Path:
    return Path(save_dir) / LOCK_NAME


def acquire(save_dir) -> None:
    """Takes (or shares, within this process) the lock of ``save_dir``; re-takes one whose file was replaced.

    Raises:
        SaveDirLockedError: when another process holds it (errno EWOULDBLOCK, filename the lock file).
    """
    key = os.path.realpath(save_dir)
    with _mutex:
        if key in _held:
            lock, holders = _held[key]
            _held[key] = (_relocked(lock, save_dir), holders + 1)
        else:
            _held[key] = (_lock(save_dir), 1)


def recheck(save_dir) -> None:
    """Re-takes the lock this process holds on ``save_dir`` if its file was removed or replaced since.

    Raises:
        SaveDirLockedError: when another job locked the new file first.
    """
    key = os.path.realpath(save_dir)
    with _mutex:
        lock, holders = _held[key]
        _held[key] = (_relocked(lock, save_dir), holders)


def release(save_dir) -> None:
    """Gives up one hold of ``save_dir``'s lock; the last holder of this process closes it."""
    key = os.path.realpath(save_dir)
    with _mutex:
        if key not in _held:
            return
        lock, holders = _held.pop(key)
        if holders > 1:
            _held[key] = (lock, holders - 1)
        else:
            lock.release()


def held_lock_files() -> List[str]:
    """The lock files this process holds, as resolved paths (what /proc/self/fd shows)."""
    with _mutex:
        return [os.path.join(key, LOCK_NAME) for key in _held]


def _lock(save_dir) -> storage.FileLock:
    path = lock_path(save_dir)
    holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode()
    try:
        return storage.storage_for(path).lock_exclusive(path, holder)
    except storage.LockHeldError as held:
        other = held.holder.decode(errors="replace").strip() or "unknown"
        raise SaveDirLockedError(
            errno.EWOULDBLOCK, f"{save_dir} is in use by another ds_fastckpt job ({other[:200]!r}); two jobs "
            "saving into one directory would rotate each other's checkpoints away: use another save_dir or stop "
            "the other job", str(path)) from None
    except storage.RefusedEntryError:  # a FIFO, device or hard link planted under our name
        raise OSError(errno.EPERM, f"{save_dir}: the save_dir lock must be a regular file with one link; "
                      "remove it (no ds_fastckpt job holds it) and save again", str(path)) from None


def _relocked(lock: storage.FileLock, save_dir) -> storage.FileLock:
    """``lock`` if it still locks ``save_dir``'s lock file, else a lock on the file there now."""
    if lock.is_current():
        return lock
    # Removed or replaced: another job could lock the new inode and save here beside us, so lock it first.
    new_lock = _lock(save_dir)
    lock.release()
    return new_lock


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock descriptors, so the lock dies with the job that took it."""
    global _mutex
    _mutex = threading.Lock()  # a thread of the parent may have held it at the fork
    for lock, _ in _held.values():
        with contextlib.suppress(OSError):
            lock.release()
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class OneLock:
    """The lock of one save_dir at a time, for an engine: holding another directory's releases the last.

    A client that saves every checkpoint into a new directory (the Hugging
    Face Trainer's ``checkpoint-N``) then holds one descriptor, not one per
    directory.
    """

    def __init__(self):
        self.directory: Optional[Path] = None

    def hold(self, save_dir: Path) -> None:
        """Holds the lock of ``save_dir`` and of no other directory; re-checks it when already held."""
        if self.directory == save_dir:
            recheck(save_dir)
            return
        self.release()
        acquire(save_dir)
        self.directory = save_dir

    def release(self) -> None:
        if self.directory is not None:
            release(self.directory)
            self.directory = None
