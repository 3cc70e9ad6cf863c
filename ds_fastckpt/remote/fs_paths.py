"""Paths under a directory that are reached without following a symlink, and ``OSError``s that name them in full.

``FsStore`` opens ``root/a/b/name`` as ``a`` relative to the root's
descriptor, then ``b`` relative to ``a``'s, each with ``O_NOFOLLOW``: a
symlink planted at any component below the root is refused with ``ELOOP``
instead of being followed out of it. Calls relative to a descriptor name
only the last component in their errors; ``about`` puts the full path back.
"""

import contextlib
import errno
import os
import stat
from typing import Iterator, Sequence

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted at a key would otherwise block the open forever; a regular file ignores it.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@contextlib.contextmanager
def about(path: str, doing: str) -> Iterator[None]:
    """Names the full ``path`` in an ``OSError`` of a call made relative to a directory descriptor."""
    try:
        yield
    except OSError as error:
        raise OSError(error.errno, f"{doing}: {error.strerror}", path) from None


def refusal(parent_fd: int, name: str, path: str, error: OSError) -> OSError:
    """The error to raise for ``error`` opening ``name`` in ``parent_fd``: ``ELOOP`` naming ``path`` for a symlink.

    ``O_DIRECTORY | O_NOFOLLOW`` on a symlink fails with ``ENOTDIR``, as on a
    file: an lstat tells the two apart.
    """
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                return OSError(errno.ELOOP, "a symlink, and no symlink under the store's root is followed", path)
    return OSError(error.errno, error.strerror, path)


def open_dir(root: str, components: Sequence[str], *, create: bool) -> int:
    """A descriptor of the directory ``root/components...``, made where missing when ``create``.

    The root itself is opened as it is (an admin may have made it a symlink);
    nothing below it is followed.

    Raises:
        FileNotFoundError: it is missing (and not ``create``), naming the first missing directory.
        OSError: ``ELOOP`` where a component is a symlink, ``ENOTDIR`` where it is a file, naming it.
    """
    if create:
        os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(components, 1):
            fd, parent = _open_child_dir(fd, name, "/".join([root, *components[:depth]]), create), fd
            os.close(parent)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_child_dir(parent_fd: int, name: str, path: str, create: bool) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path) from None
    except OSError as error:
        raise refusal(parent_fd, name, path, error) from None
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    except FileExistsError:
        pass  # another writer made it meanwhile
    except OSError as error:
        raise OSError(error.errno, f"creating the directory: {error.strerror}", path) from None
    else:
        with about(path, "fsync of its parent directory"):
            os.fsync(parent_fd)  # its entry must last as long as the objects renamed into it
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as error:
        raise refusal(parent_fd, name, path, error) from None
