"""``Storage``: the few filesystem operations the commit, rotation, scan and save_dir lock need.

Call order, as the callers use it (paths are absolute; every caller gets its
backend from ``storage_for(path)``):

- a save: ``make_dir`` (the pending directory), ``write_atomic`` of small
  files, ``remove_file`` (the pending marker), ``subdirectories`` +
  ``sync_dir`` (every pending directory), ``write_atomic`` (the manifest),
  ``rename`` or ``exchange`` (publish) + ``sync_dir`` (save_dir), then
  ``write_atomic`` (``latest``);
- a rotation: ``entry_kind`` checks, ``rename`` to the trash name,
  ``sync_dir``, then ``remove_tree``, possibly later on another thread;
- a save recycling a retired checkpoint: ``take_for_overwrite`` of each of
  its files, before the writer opens it;
- a scan: ``subdirectories``, ``exists`` and ``read_small`` of metadata;
- the lock: ``lock_exclusive`` once, ``FileLock.is_current`` at each save,
  ``FileLock.release`` at the end.

Nothing a method changes is durable until the ``sync_dir`` of the directory
holding the changed entry (``write_atomic`` with ``fsync`` does it itself).
Errors are ``OSError`` with the errno and the path the operation was about.
"""

import abc
import enum
from pathlib import Path
from typing import List, Optional, Union

PathLike = Union[str, Path]


class RefusedEntryError(OSError):
    """An entry that is not the kind an operation accepts, or larger than allowed; errno and filename are set.

    Such an entry (a symlink, FIFO, device, directory, a file with other hard
    links) may have been planted by another user of a shared save_dir: it is
    never followed, written through or waited on.
    """


class UnsafeSmallFileError(RefusedEntryError):
    """A metadata file that is not a regular file, or larger than its limit; errno and filename are set."""


class LockHeldError(BlockingIOError):
    """Another process holds the lock (errno EWOULDBLOCK, filename the lock file).

    Attributes:
        holder: the start of what the holder wrote into the lock file (untrusted bytes).
    """

    def __init__(self, code: int, message: str, filename: str, holder: bytes = b""):
        super().__init__(code, message, filename)
        self.holder = holder


class EntryKind(enum.Enum):
    """What an entry is, as seen without following a symlink."""

    DIRECTORY = "directory"
    FILE = "regular file"
    SYMLINK = "symbolic link"
    OTHER = "other"  # FIFO, device, socket


class FileLock(abc.ABC):
    """An exclusive lock on one file, held until ``release`` or the end of the process.

    The holder owns it alone: the backend drops it when the process dies, so a
    crashed job never leaves a stale lock.

    Attributes:
        path: the locked file.
    """

    path: Path

    @abc.abstractmethod
    def is_current(self) -> bool:
        """Whether the file now at ``path`` is still the one locked (not removed or replaced since).

        A lock on a file that was replaced no longer excludes anyone: another
        process can lock the new file at ``path``.
        """

    @abc.abstractmethod
    def release(self) -> None:
        """Drops the lock and whatever it holds open; a second call does nothing.

        In a forked child, releases only the child's copy: the parent keeps its lock.
        """


class Storage(abc.ABC):
    """The filesystem operations of ds_fastckpt; ``PosixStorage`` is today's, one per process."""

    @abc.abstractmethod
    def write_atomic(self, path: PathLike, data: bytes, temp: PathLike, *, fsync: bool = True) -> None:
        """Replaces the entry at ``path`` with a file holding ``data``: readers see the old or new content, never a mix.

        Args:
            path: the file to replace or create; when it is a symlink, the link itself is replaced, never its
                target written.
            data: the whole new content.
            temp: a name beside ``path`` that nobody else uses, for the content until it replaces ``path``. It
                must be created exclusively: an entry already there (a symlink planted under our name) is
                refused with ``FileExistsError``, never followed, truncated or written. It is gone afterwards,
                whether the write succeeded or not.
            fsync: make the content and the directory entry durable before returning.

        Raises:
            OSError: with errno and path (``temp`` for the content, ``path``'s directory for its fsync); on
                error ``path`` keeps its old content.
        """

    @abc.abstractmethod
    def read_small(self, path: PathLike, limit: int) -> bytes:
        """The content of the regular file ``path``, of at most ``limit`` bytes.

        Never follows a symlink at ``path``, never blocks on a FIFO or device,
        never reads more than ``limit + 1`` bytes, even from a file that grows.

        Raises:
            FileNotFoundError: when nothing is at ``path``.
            UnsafeSmallFileError: when it is a symlink (errno ELOOP), a FIFO, device, socket or directory
                (EINVAL), or larger than ``limit`` bytes (EFBIG).
            OSError: when it cannot be read, with errno and path.
        """

    @abc.abstractmethod
    def sync_dir(self, path: PathLike) -> None:
        """Makes the entries of directory ``path`` (creations, renames, removals) durable.

        Never retried after a failure: the cached changes may be dropped by
        then, so a second attempt can succeed with them lost.

        Raises:
            OSError: with errno and ``path``, and "fsync" in the message.
        """

    @abc.abstractmethod
    def make_dir(self, path: PathLike, *, parents: bool = False, exist_ok: bool = False) -> None:
        """Creates directory ``path`` (and its missing parents with ``parents``); not durable until ``sync_dir``.

        With ``exist_ok``, an existing directory, or a symlink to one (a
        save_dir may be reached through a link), is accepted.

        Raises:
            FileExistsError: when ``path`` exists and not ``exist_ok`` (or exists and is not a directory).
            OSError: with errno and path.
        """

    @abc.abstractmethod
    def rename(self, source: PathLike, destination: PathLike) -> None:
        """Moves the entry ``source`` to ``destination`` in one atomic step; not durable until ``sync_dir``.

        Callers use it only where ``destination`` does not exist (they
        ``exchange`` otherwise): a backend may refuse an existing one with
        ``FileExistsError``; POSIX ``rename`` replaces a file or empty directory.

        Raises:
            OSError: with errno and path.
        """

    @abc.abstractmethod
    def exchange(self, first: PathLike, second: PathLike) -> None:
        """Swaps two existing entries in one atomic step, so that neither name is ever missing.

        A backend that cannot do it atomically must refuse (errno ENOSYS,
        EINVAL or EXDEV), never emulate it with two renames.

        Raises:
            OSError: with errno and ``second`` as filename, the message naming ``first``.
        """

    @abc.abstractmethod
    def remove_file(self, path: PathLike, *, missing_ok: bool = False) -> None:
        """Removes the entry ``path`` (a symlink itself, never its target); refuses a directory.

        Not durable until ``sync_dir``.

        Raises:
            FileNotFoundError: when nothing is at ``path`` and not ``missing_ok``.
            OSError: with errno and path (a directory: EISDIR or EPERM).
        """

    @abc.abstractmethod
    def remove_tree(self, path: PathLike) -> None:
        """Removes directory ``path`` and all it holds, never following a symlink.

        A symlink inside is removed as an entry; what it points to is never
        touched. A symlink at ``path`` itself is refused. Not atomic: callers
        first rename a directory to a name that marks it as being deleted.

        Raises:
            OSError: with errno and the path that failed; what was removed before stays removed.
        """

    @abc.abstractmethod
    def entry_kind(self, path: PathLike) -> Optional[EntryKind]:
        """What the entry ``path`` is, without following a symlink; None when nothing is there.

        Raises:
            OSError: when it cannot be looked at (EACCES, ENOTDIR, ...), with errno and path.
        """

    @abc.abstractmethod
    def subdirectories(self, path: PathLike) -> List[str]:
        """The names of the entries directly in ``path`` that are real directories (never symlinks), any order.

        Raises:
            OSError: when ``path`` cannot be listed, with errno and path.
        """

    @abc.abstractmethod
    def free_bytes(self, path: PathLike) -> int:
        """How many bytes a new file in directory ``path`` may take before the storage is full.

        Raises:
            OSError: with errno and path.
        """

    @abc.abstractmethod
    def lock_exclusive(self, path: PathLike, content: bytes) -> FileLock:
        """Locks the file ``path`` (created if missing) against every other process, without waiting.

        Never follows a symlink or waits on a FIFO at ``path``, and never
        writes through a file with other hard links. Once locked, the file's
        content is replaced with ``content`` (who holds it, for the message
        another process gets).

        Raises:
            LockHeldError: when another process holds it; ``holder`` is the start of its content.
            RefusedEntryError: when ``path`` is not a regular file with one link (errno EPERM).
            OSError: when it cannot be opened (ELOOP for a symlink), with errno and path.
        """

    def take_for_overwrite(self, source: PathLike, destination: PathLike) -> bool:
        """Moves the file ``source`` to ``destination`` to be written over in place, if that is safe; returns whether.

        Safe means: ``source`` is a regular file (not a symlink), has one link,
        and no process has it open or mapped, so writing over it changes what
        nobody else can see (a hard link a user made to keep a checkpoint, or a
        reader still going through one, keeps its bytes). When it is not
        safe, or cannot be known, nothing changes and the answer is False: the
        caller writes a new file. This default never recycles.

        Also not safe: a file or directory this process may not change (a
        checkpoint made read-only with ``chmod -R a-w``): it is left where it
        is, and the answer is False.

        Raises:
            OSError: from the rename, with errno and path; what the checks could not look at, or a rename this
                process is not allowed (EACCES, EPERM), is a False.
        """
        return False

    def reusable_bytes(self, path: PathLike) -> int:
        """How many bytes of the file ``path`` a save writing over it in place would not need anew.

        Its allocated size when ``take_for_overwrite`` would take it now, else 0 (nothing changes either way).
        The disk guard counts these as room: a save that recycles a spare needs no more space than it frees.
        This default never recycles.
        """
        return 0

    def cannot_remove(self, path: PathLike) -> Optional[str]:
        """Why ``remove_tree(path)`` would be refused for lack of permission, or None when nothing is seen to stop it.

        A directory this process may not change (``chmod -R a-w``, someone else's) cannot have its entries
        removed; such a tree is left where it is rather than half removed. Symlinks are not followed.
        """
        return None

    @abc.abstractmethod
    def make_sized_file(self, path: PathLike, size: int, *, keep_blocks: bool = False) -> None:
        """Makes the regular file ``path`` exactly ``size`` bytes long, for several writers to fill in place.

        A new file is sparse. ``keep_blocks`` keeps what an existing file holds (its blocks are written over,
        see ``take_for_overwrite``); otherwise an existing file is emptied first. A symlink is never followed.

        Raises:
            OSError: with errno and path (ELOOP for a symlink).
        """

    def exists(self, path: PathLike) -> bool:
        """Whether an entry is at ``path`` (a dangling symlink counts); False when it cannot be looked at."""
        try:
            return self.entry_kind(path) is not None
        except (OSError, ValueError):  # as os.path.lexists: an unreadable parent or a NUL in the name
            return False

    def is_real_dir(self, path: PathLike) -> bool:
        """Whether ``path`` is a directory itself, not a symlink to one; False when nothing is there."""
        return self.entry_kind(path) is EntryKind.DIRECTORY
