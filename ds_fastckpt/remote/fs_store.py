"""``FsStore``: an ``ObjectStore`` in a directory of a shared filesystem (Lustre, NFS, GPFS), one file per key.

An object appears whole or not at all: it is written under a temporary name
in its directory (``.<name>.<16 hex>.ds_fastckpt-upload``), fsynced, renamed
over its key, and the directory fsynced. Nothing under the root is reached
through a symlink: each directory is opened one component at a time with
``O_NOFOLLOW``, so a symlink planted where a directory or an object belongs
is refused (``ELOOP``) rather than written through or read from.

The filesystem's failures that say it cannot be reached or used now (an NFS
server gone, a stale handle, no permission, full) are
``RemoteUnavailableError``, so that the caller retries them like S3's; the
local file's own errors stay ``OSError``.
"""

import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

from ds_fastckpt.format.manifest import check_relative_path
from ds_fastckpt.remote.fs_paths import READ_FLAGS, about, open_dir, refusal
from ds_fastckpt.remote.parts import (NEW_FILE_FLAGS, NEW_FILE_MODE, PartPool, check_transfer, combine_crcs,
                                      crc32c_of, downloading_to, naming, open_to_upload, part_ranges, read_part,
                                      run_parts, write_part)
from ds_fastckpt.remote.store import (ObjectStore, RemoteIntegrityError, RemoteObject, RemoteObjectTooLargeError,
                                      RemoteUnavailableError)

TEMP_SUFFIX = ".ds_fastckpt-upload"
_NAME_MAX = 255
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{16}" + re.escape(TEMP_SUFFIX) + "$", re.S)
_UNAVAILABLE_ERRNOS = frozenset({
    errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN,
    errno.ENETUNREACH, errno.ECONNREFUSED, errno.ECONNRESET, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
    errno.EDQUOT,
})


def temp_name(name: str) -> str:
    """The name an object ``name`` is written under until it is complete.

    A name too long to take the 37 characters added is cut, so that the
    temporary name stays within the 255 bytes a name may have.
    """
    if len(name.encode()) > _NAME_MAX - 64:
        name = name[:64]
    return f".{name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


class FsStore(ObjectStore):
    """A directory on a shared filesystem, each key a file under it. Safe to use from several threads at once.

    Args:
        root: absolute path of the directory; created (with its parents) by the first write or ``check_reachable``.
        part_size: bytes each thread copies at a time.
        concurrency: parts copied at once, for all transfers of this store together.
    """

    def __init__(self, root: str, *, part_size: int, concurrency: int):
        if not os.path.isabs(root) or os.path.normpath(root) == "/":
            raise ValueError(f"FsStore needs an absolute directory path other than '/', not {root!r}")
        if part_size < 1 or concurrency < 1:
            raise ValueError(f"part_size and concurrency must be positive, not {part_size} and {concurrency}")
        self.url = root
        self.root = os.path.normpath(root)
        self.part_size = part_size
        self._executor = PartPool(concurrency, "ds_fastckpt-fs")

    def describe(self) -> str:
        return self.root

    def close(self) -> None:
        """Stops the copying threads once the copies running end; the store is not used afterwards."""
        self._executor.shutdown()

    def _path(self, *components: str) -> str:
        return "/".join((self.root,) + tuple(component for component in components if component))

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        """Raises ``RemoteUnavailableError`` for a failure of the store's filesystem, not of the local file."""
        try:
            yield
        except OSError as error:
            where = str(error.filename or "")
            if error.errno in _UNAVAILABLE_ERRNOS and (where == self.root or where.startswith(self.root + "/")):
                raise RemoteUnavailableError(f"{self.describe()}: {error}") from error
            raise

    def check_reachable(self) -> None:
        probe = self._path(temp_name("reachable"))
        try:
            os.makedirs(self.root, exist_ok=True)
            os.close(os.open(probe, NEW_FILE_FLAGS, NEW_FILE_MODE))
            os.unlink(probe)
        except OSError as error:
            raise RemoteUnavailableError(f"{self.describe()} is not a directory this process can write to: "
                                         f"{error}") from error

    @staticmethod
    def _split(key: str) -> Tuple[List[str], str]:
        components = check_relative_path(key).split("/")
        return components[:-1], components[-1]

    def _open_object(self, key: str) -> Tuple[int, int]:
        """A descriptor of the regular file at ``key``, and its size.

        Raises:
            FileNotFoundError: (naming the key) nothing there, or something that is no file (a directory).
        """
        directories, name = self._split(key)
        missing = FileNotFoundError(errno.ENOENT, f"no object {key!r} in {self.describe()}", key)
        try:
            parent = open_dir(self.root, directories, create=False)
        except FileNotFoundError:
            raise missing from None
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise missing from None
        except OSError as error:
            raise refusal(parent, name, self._path(key), error) from None
        finally:
            os.close(parent)
        try:
            with naming(self._path(key), "stat"):
                status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise missing
            return fd, status.st_size
        except BaseException:
            os.close(fd)
            raise

    def _write_object(self, key: str, fill: Callable[[int, str], None]) -> None:
        """``fill(fd, path)`` writes a new temporary file, which then replaces ``key`` whole, durably."""
        directories, name = self._split(key)
        directory = self._path(*directories)
        parent = open_dir(self.root, directories, create=True)
        try:
            temp = temp_name(name)
            temp_path = f"{directory}/{temp}"
            with about(temp_path, "creating"):
                fd = os.open(temp, NEW_FILE_FLAGS, NEW_FILE_MODE, dir_fd=parent)
            try:
                try:
                    fill(fd, temp_path)
                    with naming(temp_path, "fsync"):
                        os.fsync(fd)
                finally:
                    os.close(fd)
                with about(self._path(key), "renaming into place"):
                    os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=parent)
                raise
            with naming(directory, "fsync"):
                os.fsync(parent)
        finally:
            os.close(parent)

    def _copy_parts(self, source: Tuple[int, str], target: Tuple[int, str], what: str, key: str,
                    size: int) -> List[Tuple[int, int]]:
        """Copies ``size`` bytes in parallel parts; ``(crc, length)`` of each part, in order."""
        (source_fd, source_path), (target_fd, target_path) = source, target

        def copy(offset: int, length: int) -> Tuple[int, int]:
            data = read_part(source_fd, offset, length, source_path)
            if len(data) != length:
                raise RemoteIntegrityError(f"{what} of {key!r}: expected {size} bytes, {source_path} ended at "
                                           f"{offset + len(data)} while it was read")
            write_part(target_fd, data, offset, target_path)
            return crc32c_of(data), length

        with naming(target_path, f"extending to {size} bytes"):
            os.ftruncate(target_fd, size)
        return run_parts(self._executor, copy, part_ranges(size, self.part_size))

    def upload_file(self, local_path: Path, key: str, *, size: int, crc32c: int) -> None:
        with self._mapped():
            source = open_to_upload(local_path, key, size)
            try:

                def fill(fd: int, temp_path: str) -> None:
                    parts = self._copy_parts((source, str(local_path)), (fd, temp_path), "upload", key, size)
                    check_transfer("upload", key, local_path, expected_size=size, expected_crc=crc32c,
                                   got_size=sum(length for _, length in parts), got_crc=combine_crcs(parts))

                self._write_object(key, fill)
            finally:
                os.close(source)

    def download_file(self, key: str, local_path: Path, *, size: int, crc32c: int) -> None:
        with self._mapped():
            source, stored_size = self._open_object(key)
            try:
                if stored_size != size:
                    raise RemoteIntegrityError(f"download of {key!r} ({local_path}): the manifest records {size} "
                                               f"bytes, the object has {stored_size}")
                with downloading_to(local_path) as fd:
                    parts = self._copy_parts((source, self._path(key)), (fd, str(local_path)), "download", key, size)
                    check_transfer("download", key, local_path, expected_size=size, expected_crc=crc32c,
                                   got_size=sum(length for _, length in parts), got_crc=combine_crcs(parts))
            finally:
                os.close(source)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._mapped():
            self._write_object(key, lambda fd, path: write_part(fd, data, 0, path))

    def get_bytes(self, key: str, limit: int) -> Optional[bytes]:
        with self._mapped():
            try:
                fd, size = self._open_object(key)
            except FileNotFoundError:
                return None
            try:
                data = b"" if size > limit else read_part(fd, 0, limit + 1, self._path(key))
            finally:
                os.close(fd)
        if size > limit or len(data) > limit:
            raise RemoteObjectTooLargeError(f"{self.describe()}: {key!r} is larger than {limit} bytes")
        return data

    def _walk(self, prefix: str) -> Iterator[Tuple[str, str, int]]:
        """``(key, name, directory fd)`` of every non-directory entry whose key starts with ``prefix``.

        Symlinked directories are not entered. A directory deleted while it is
        walked is skipped; any other failure to list one is raised.
        """
        start = prefix.rpartition("/")[0]
        directories = check_relative_path(start).split("/") if start else []
        try:
            start_fd = open_dir(self.root, directories, create=False)
        except FileNotFoundError:
            return

        def raise_unless_gone(error: OSError) -> None:
            if not isinstance(error, FileNotFoundError):
                raise OSError(error.errno, f"listing: {error.strerror}", self._path(start)) from error

        try:
            with contextlib.closing(os.fwalk(".", dir_fd=start_fd, onerror=raise_unless_gone)) as walk, \
                    naming(self._path(start), "listing"):
                for dirpath, _, names, dir_fd in walk:
                    below = os.path.normpath(dirpath)
                    base = "/".join(part for part in (start, "" if below == "." else below) if part)
                    for name in names:
                        key = f"{base}/{name}" if base else name
                        if key.startswith(prefix) or _TEMP_NAME.match(name):
                            yield key, name, dir_fd
        finally:
            os.close(start_fd)

    def _objects(self, prefix: str) -> Iterator[RemoteObject]:
        """The objects whose key starts with ``prefix``: regular files, not symlinks or temporary names."""
        with contextlib.closing(self._walk(prefix)) as walk:
            for key, name, dir_fd in walk:
                if not key.startswith(prefix) or _TEMP_NAME.match(name):
                    continue
                try:
                    with about(self._path(key), "stat"):
                        status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                if stat.S_ISREG(status.st_mode):
                    yield RemoteObject(key, status.st_size, status.st_mtime)

    def list_keys(self, prefix: str) -> List[RemoteObject]:
        with self._mapped():
            return list(self._objects(prefix))

    def list_tags(self) -> List[str]:
        with self._mapped():
            try:
                with os.scandir(self.root) as entries:
                    names = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                return []
            tags = []
            for name in names:
                with contextlib.closing(self._objects(f"{name}/")) as objects:
                    if next(objects, None) is not None:  # one object is enough, however many the tag holds
                        tags.append(name)
            return tags

    def delete(self, keys: Iterable[str]) -> None:
        with self._mapped():
            emptied = set()
            for key in keys:
                directories, name = self._split(key)
                try:
                    parent = open_dir(self.root, directories, create=False)
                except FileNotFoundError:
                    continue
                try:
                    with about(self._path(key), "deleting"):
                        os.unlink(name, dir_fd=parent)
                    emptied.add(tuple(directories))
                except (FileNotFoundError, IsADirectoryError):
                    pass  # nothing there, or a directory: no object, as S3 would say
                finally:
                    os.close(parent)
            # Deletions are not fsynced: one that a crash undoes is done again by the next rotation.
            for directories in sorted(emptied, key=len, reverse=True):
                self._remove_empty_directories(list(directories))

    def _remove_empty_directories(self, directories: List[str]) -> None:
        """Removes ``root/directories...`` and then its parents while they are empty; never the root."""
        while directories:
            try:
                parent = open_dir(self.root, directories[:-1], create=False)
            except FileNotFoundError:
                return
            try:
                os.rmdir(directories[-1], dir_fd=parent)
            except FileNotFoundError:
                pass  # removed already, through another key's chain
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    return
                raise OSError(error.errno, f"removing the empty directory: {error.strerror}",
                              self._path(*directories)) from None
            finally:
                os.close(parent)
            directories = directories[:-1]

    def abort_uploads(self, prefix: str) -> int:
        removed = 0
        with self._mapped(), contextlib.closing(self._walk(prefix)) as walk:
            for key, name, dir_fd in walk:
                match = _TEMP_NAME.match(name)
                if match is None or not (key[:-len(name)] + match["name"]).startswith(prefix):
                    continue
                try:
                    with about(self._path(key), "removing an interrupted upload"):
                        os.unlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue
                removed += 1
        return removed
