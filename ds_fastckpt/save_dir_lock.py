"""One job per save_dir: an exclusive ``flock`` on ``save_dir/.ds_fastckpt.lock``, held while the job runs.

Two jobs saving into one directory would rotate each other's checkpoints
away. The storage leader takes the lock at its first save into a directory
and keeps it until ``engine.destroy()`` or the process ends; the kernel drops
a ``flock`` when its holder dies, so a crashed job never leaves a stale lock.
Engines of one process share the lock (re-creating an engine to resume is
common). ``flock`` is per host: on a filesystem shared by several hosts (NFS)
it does not see the other hosts.
"""

import errno
import fcntl
import os
import socket
import threading
import time
from pathlib import Path
from typing import Dict, Tuple

LOCK_NAME = ".ds_fastckpt.lock"

_held: Dict[str, Tuple[int, int]] = {}  # realpath of save_dir -> (fd, holders in this process)
_mutex = threading.Lock()


class SaveDirLockedError(OSError):
    """Another job is saving into this save_dir; the message says which (pid, host, since when)."""


def lock_path(save_dir) -> Path:
    return Path(save_dir) / LOCK_NAME


def acquire(save_dir) -> None:
    """Takes (or shares, within this process) the lock of ``save_dir``.

    Raises:
        SaveDirLockedError: when another process holds it (errno EWOULDBLOCK, filename the lock file).
    """
    key = os.path.realpath(save_dir)
    with _mutex:
        if key in _held:
            fd, holders = _held[key]
            _held[key] = (fd, holders + 1)
            return
        path = lock_path(save_dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SaveDirLockedError(
                errno.EWOULDBLOCK, f"{save_dir} is in use by another ds_fastckpt job ({holder}); two jobs saving "
                "into one directory would rotate each other's checkpoints away: use another save_dir or stop "
                "the other job", str(path)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
        _held[key] = (fd, 1)


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
