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
several hosts (NFS) it does not see the other hosts.
"""

import contextlib
import errno
import fcntl
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

from ds_fastckpt.format.names import LOCK_NAME

_held: Dict[str, Tuple[int, int]] = {}  # realpath of save_dir -> (fd, holders in this process)
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
            fd, holders = _held[key]
            _held[key] = (_relocked(fd, save_dir), holders + 1)
        else:
            _held[key] = (_lock(save_dir), 1)


def recheck(save_dir) -> None:
    """Re-takes the lock this process holds on ``save_dir`` if its file was removed or replaced since.

    Raises:
        SaveDirLockedError: when another job locked the new file first.
    """
    key = os.path.realpath(save_dir)
    with _mutex:
        fd, holders = _held[key]
        _held[key] = (_relocked(fd, save_dir), holders)


def release(save_dir) -> None:
    """Gives up one hold of ``save_dir``'s lock; the last holder of this process closes it."""
    key = os.path.realpath(save_dir)
    with _mutex:
        if key not in _held:
            return
        fd, holders = _held.pop(key)
        if holders > 1:
            _held[key] = (fd, holders - 1)
        else:
            os.close(fd)


def held_lock_files() -> List[str]:
    """The lock files this process holds, as resolved paths (what /proc/self/fd shows)."""
    with _mutex:
        return [os.path.join(key, LOCK_NAME) for key in _held]


def _lock(save_dir) -> int:
    path = lock_path(save_dir)
    # O_NOFOLLOW and O_NONBLOCK: a symlink or FIFO planted under our name in a shared save_dir is neither
    # followed nor waited on.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # never write through a hard link to a file
            raise OSError(errno.EPERM, f"{save_dir}: the save_dir lock must be a regular file with one link; "
                          "remove it (no ds_fastckpt job holds it) and save again", str(path))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SaveDirLockedError(
            errno.EWOULDBLOCK, f"{save_dir} is in use by another ds_fastckpt job ({holder[:200]!r}); two jobs "
            "saving into one directory would rotate each other's checkpoints away: use another save_dir or stop "
            "the other job", str(path)) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
    return fd


def _relocked(fd: int, save_dir) -> int:
    """``fd`` if it still locks ``save_dir``'s lock file, else a descriptor locking the file there now."""
    if _still_locked(fd, save_dir):
        return fd
    # Removed or replaced: another job could lock the new inode and save here beside us, so lock it first.
    new_fd = _lock(save_dir)
    os.close(fd)
    return new_fd


def _still_locked(fd: int, save_dir) -> bool:
    """Whether ``save_dir``'s lock file is still the inode ``fd`` locked."""
    try:
        on_disk = os.lstat(lock_path(save_dir))
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock descriptors, so the lock dies with the job that took it."""
    global _mutex
    _mutex = threading.Lock()  # a thread of the parent may have held it at the fork
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)
