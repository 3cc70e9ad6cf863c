"""``PosixStorage``: ``Storage`` on a local or POSIX filesystem, with the syscalls that make each step safe.

Every ``os`` function is looked up at call time (``os.fsync``, not a name
bound at import), so a test that wraps one to inject a fault sees the calls.
"""

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path
from typing import List, Optional

from ds_fastckpt.storage.base import (EntryKind, FileLock, LockHeldError, PathLike, RefusedEntryError, Storage,
                                      UnsafeSmallFileError)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# O_NOFOLLOW and O_NONBLOCK: a symlink or FIFO planted under the lock's name is neither followed nor waited on.
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_LOCK_HOLDER_BYTES = 512
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class PosixStorage(Storage):
    """``Storage`` through POSIX syscalls: ``O_NOFOLLOW``/``O_EXCL`` opens, ``fsync``, ``rename``, ``renameat2``."""

    def write_atomic(self, path: PathLike, data: bytes, temp: PathLike, *, fsync: bool = True) -> None:
        path, temp = Path(path), Path(temp)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if fsync:
                    _fsync(fd, temp)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)  # ours; `path` keeps its old content
            raise
        if fsync:
            self.sync_dir(path.parent)

    def read_small(self, path: PathLike, limit: int) -> bytes:
        # lstat first, so a FIFO or device is never opened at all; the open and fstat then catch an entry
        # swapped in between.
        _require_regular(os.lstat(path).st_mode, path)
        fd = os.open(path, _READ_FLAGS)
        try:
            info = os.fstat(fd)
            _require_regular(info.st_mode, path)
            if info.st_size > limit:
                raise _too_large(path, limit, f"{info.st_size} bytes")
            chunks, total = [], 0
            while chunk := os.read(fd, limit + 1 - total):
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise _too_large(path, limit, "it grew while being read")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def sync_dir(self, path: PathLike) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _fsync(fd, path)
        finally:
            os.close(fd)

    def make_dir(self, path: PathLike, *, parents: bool = False, exist_ok: bool = False) -> None:
        if parents:
            os.makedirs(path, exist_ok=exist_ok)
            return
        try:
            os.mkdir(path)
        except FileExistsError:
            if not (exist_ok and os.path.isdir(path)):  # as os.makedirs: a link to a directory will do
                raise

    def rename(self, source: PathLike, destination: PathLike) -> None:
        os.rename(source, destination)

    def exchange(self, first: PathLike, second: PathLike) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{os.strerror(err)} (renameat2 RENAME_EXCHANGE with {first})", str(second))

    def remove_file(self, path: PathLike, *, missing_ok: bool = False) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self, path: PathLike) -> None:
        # shutil.rmtree unlinks symlinks inside instead of following them, and refuses one at `path`.
        shutil.rmtree(path)

    def take_for_overwrite(self, source: PathLike, destination: PathLike) -> bool:
        if _may_write_over(source) is None:
            return False
        try:
            os.rename(source, destination)
        except PermissionError:  # EACCES/EPERM: a directory made read-only or sticky since the check
            return False
        return True

    def reusable_bytes(self, path: PathLike) -> int:
        found = _may_write_over(path)
        return 0 if found is None else found.st_blocks * 512

    def cannot_remove(self, path: PathLike) -> Optional[str]:
        # Removing an entry takes write and search permission on the directory holding it, not on the entry:
        # only the directories of the tree matter (a read-only file in a writable directory can be removed).
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None  # a symlink or file: never looked into; the deleter refuses it itself
        except FileNotFoundError:
            return None
        stack = [os.fspath(path)]
        while stack:
            directory = stack.pop()
            if not _may_change(directory):
                return None if not os.path.lexists(directory) else f"directory {directory} is not writable " \
                    "by this process (made read-only, or another user's)"
            try:
                with os.scandir(directory) as entries:
                    stack.extend(entry.path for entry in entries if entry.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                continue
            except OSError as error:
                return f"directory {directory} cannot be listed ({error.strerror})"
        return None

    def make_sized_file(self, path: PathLike, size: int, *, keep_blocks: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if keep_blocks else os.O_TRUNC)
        fd = os.open(path, flags, 0o666)
        try:
            os.ftruncate(fd, size)
        except OSError as error:
            raise OSError(error.errno, f"{error.strerror} (ftruncate to {size} bytes)", str(path)) from None
        finally:
            os.close(fd)

    def entry_kind(self, path: PathLike) -> Optional[EntryKind]:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(mode):
            return EntryKind.DIRECTORY
        if stat.S_ISREG(mode):
            return EntryKind.FILE
        return EntryKind.SYMLINK if stat.S_ISLNK(mode) else EntryKind.OTHER

    def subdirectories(self, path: PathLike) -> List[str]:
        with os.scandir(path) as entries:
            return [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]

    def free_bytes(self, path: PathLike) -> int:
        return shutil.disk_usage(path).free

    def lock_exclusive(self, path: PathLike, content: bytes) -> FileLock:
        fd = os.open(path, _LOCK_FLAGS, 0o644)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # never write through a hard link to a file
                raise RefusedEntryError(errno.EPERM, "not a regular file with one link; not locked", str(path))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, content, 0)
        except BlockingIOError:
            try:
                holder = os.pread(fd, _LOCK_HOLDER_BYTES, 0)
            finally:
                os.close(fd)
            raise LockHeldError(errno.EWOULDBLOCK, "locked by another process", str(path), holder) from None
        except BaseException:
            os.close(fd)
            raise
        return _PosixFileLock(fd, Path(path))


class _PosixFileLock(FileLock):
    """An ``flock`` held through the one descriptor this object owns; the kernel drops it when the holder dies."""

    def __init__(self, fd: int, path: Path):
        self._fd = fd
        self.path = path

    def is_current(self) -> bool:
        try:
            on_disk = os.lstat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _may_write_over(source: PathLike) -> Optional[os.stat_result]:
    """``source``'s status when writing over it in place changes what nobody else can see, else None.

    That is: a regular file (not a symlink) with one link, which this process
    may write and rename away (its directory writable too), and which no
    process has open or mapped. The last is asked with a write lease, which the
    kernel grants only while no other descriptor or mapping of the file exists
    anywhere; it is released at once. Changes nothing.
    """
    try:
        fd = os.open(source, _READ_FLAGS)
    except OSError:
        return None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
            return None
        # A file or directory made read-only (chmod -R a-w to keep a good checkpoint) is never written over;
        # the kernel answers for this process, through the open descriptor, so no path swap can fool it.
        if not _may_change(f"/proc/self/fd/{fd}", os.W_OK) or not _may_change(os.path.dirname(source) or "."):
            return None
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:  # EAGAIN: open elsewhere; EACCES: not our file; EINVAL: no leases on this filesystem
        return None
    finally:
        os.close(fd)
    return found


def _may_change(path: PathLike, mode: int = os.W_OK | os.X_OK) -> bool:
    """Whether this process (its effective ids, its capabilities) may write ``path`` (a directory: its entries)."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _fsync(fd: int, path: PathLike) -> None:
    """os.fsync, with the path in its error (fsync's own names no file). Never retried: after a failed
    fsync the kernel may have dropped the dirty pages, so a second call can succeed with the data lost."""
    try:
        os.fsync(fd)
    except OSError as error:
        raise OSError(error.errno, f"{error.strerror} (fsync)", str(path)) from None


def _require_regular(mode: int, path: PathLike) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "of an unknown type")
    code = errno.ELOOP if stat.S_ISLNK(mode) else errno.EINVAL
    raise UnsafeSmallFileError(code, f"it is {kind}, not a regular file; not read", str(path))


def _too_large(path: PathLike, limit: int, found: str) -> UnsafeSmallFileError:
    return UnsafeSmallFileError(errno.EFBIG, f"larger than {limit} bytes, the most read here ({found}); not read",
                                str(path))
