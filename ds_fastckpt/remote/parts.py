"""Transfers in parts: where each part lies, running parts in parallel, and the CRC-32C of the whole from its parts.

Both stores move a file as parts of ``part_size`` bytes on a thread pool and
check the bytes moved against the size and CRC-32C the manifest records;
this module holds what they share. Every ``OSError`` raised here names the
local or remote path it concerns, so a caller can tell the two apart.
"""

import concurrent.futures
import contextlib
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple, TypeVar, Union

from ds_fastckpt.native.op import load_op
from ds_fastckpt.remote.store import RemoteIntegrityError

T = TypeVar("T")

# Flags of a file a download creates: never an existing file, never through a symlink, never inherited by a child.
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_MODE = 0o644
WRITE_SLICE = 256 << 10  # bytes per pwrite of a downloaded part (see write_part)


def part_ranges(size: int, part_size: int) -> List[Tuple[int, int]]:
    """``(offset, length)`` of each part of a ``size``-byte file, in order; none for an empty file."""
    if part_size <= 0:
        raise ValueError(f"part_size must be positive, not {part_size}")
    return [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)]


def crc32c_of(data: Union[bytes, bytearray, memoryview], crc: int = 0) -> int:
    """CRC-32C of ``data`` by the native op (which lets other threads run meanwhile), extending ``crc``."""
    return load_op().crc32c(data, crc=crc)


def combine_crcs(parts: Sequence[Tuple[int, int]]) -> int:
    """The CRC-32C of the concatenation of parts given as ``(crc, length)``, in order."""
    op = load_op()
    whole = 0
    for crc, length in parts:
        whole = op.crc32c_combine(whole, crc, length)
    return whole


class PartPool(concurrent.futures.Executor):
    """A fixed pool of daemon threads running parts, usable until ``shutdown`` whatever the interpreter does.

    Not a ``ThreadPoolExecutor``: that one refuses new work once the interpreter starts exiting (before the
    ``atexit`` handlers run) and holds the exit until its queue is empty, while the remote tier uploads the
    checkpoint committed at exit from an ``atexit`` handler, and must never hold the exit beyond its own bound.

    Args:
        workers: threads.
        name: their name prefix.
    """

    def __init__(self, workers: int, name: str):
        self._work: "queue.SimpleQueue" = queue.SimpleQueue()
        self._closed = False
        for index in range(workers):
            threading.Thread(target=self._run, name=f"{name}_{index}", daemon=True).start()

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("this part pool is shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Lets each thread end after the work queued before; ``wait`` is not honoured (daemon threads)."""
        self._closed = True
        self._work.put(None)

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                self._work.put(None)  # the next thread ends too
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:  # handed to whoever waits on the future
                future.set_exception(error)


def run_parts(executor: concurrent.futures.Executor, work: Callable[[int, int], T],
              ranges: Sequence[Tuple[int, int]]) -> List[T]:
    """``work(offset, length)`` of every range on ``executor``; the results in the order of ``ranges``.

    When one part fails, the parts not started are cancelled and the ones
    running are waited for before the first error is raised: the caller
    closes the descriptors the parts use only once no part can touch them
    (a closed descriptor's number is soon another file's).
    """
    futures = [executor.submit(work, offset, length) for offset, length in ranges]
    try:
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
        raise


@contextlib.contextmanager
def naming(path: Union[str, Path], doing: str) -> Iterator[None]:
    """Adds ``path`` to an ``OSError`` that names no file (``os.pread``, ``os.fsync`` on a descriptor name none)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, f"{doing}: {error.strerror}", str(path)) from error


def read_part(fd: int, offset: int, length: int, path: Union[str, Path]) -> bytes:
    """Up to ``length`` bytes at ``offset``; fewer only where the file ends before (it shrank)."""
    chunks = []
    done = 0
    while done < length:
        with naming(path, f"reading {length} bytes at offset {offset}"):
            chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def write_part(fd: int, data: Union[bytes, memoryview], offset: int, path: Union[str, Path]) -> None:
    """All of ``data`` at ``offset``, in writes of at most ``WRITE_SLICE`` bytes.

    One 16 MiB ``pwrite`` per part spent 2-4 s of kernel time per GiB copying into the page cache in half the
    rounds of benchmarks/bench_replicate.py on the development VM; 256 KiB writes of the same part never did.
    """
    view = memoryview(data)
    done = 0
    while done < len(view):
        with naming(path, f"writing {len(view)} bytes at offset {offset}"):
            done += os.pwrite(fd, view[done:done + WRITE_SLICE], offset + done)


@contextlib.contextmanager
def downloading_to(local_path: Union[str, Path]) -> Iterator[int]:
    """A new file at ``local_path`` (``create_new_file``) for a download: fsynced when the block ends, closed
    either way, and removed when the block raises."""
    fd = create_new_file(local_path)
    try:
        try:
            yield fd
            with naming(local_path, "fsync"):
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        remove_quietly(local_path)
        raise


def create_new_file(path: Union[str, Path]) -> int:
    """A descriptor of a new, empty file at ``path``, opened for writing.

    Raises:
        FileExistsError: something is already there, a dangling symlink included (nothing is followed).
    """
    return os.open(path, NEW_FILE_FLAGS, NEW_FILE_MODE)


def remove_quietly(path: Union[str, Path]) -> None:
    """Removes the file a failed download created; a file already gone is no error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def open_to_upload(local_path: Union[str, Path], key: str, size: int) -> int:
    """A read-only descriptor of the file to upload to ``key``, once its size is the ``size`` the manifest records.

    Raises:
        RemoteIntegrityError: the file has another size (nothing stays open).
        OSError: with errno and path.
    """
    fd = os.open(local_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with naming(local_path, "stat"):
            local_size = os.fstat(fd).st_size
        if local_size != size:
            raise RemoteIntegrityError(f"upload of {key!r} ({local_path}): the manifest records {size} bytes, "
                                       f"the file has {local_size}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_transfer(what: str, key: str, local_path: Union[str, Path], *, expected_size: int, expected_crc: int,
                   got_size: int, got_crc: int) -> None:
    """Raises ``RemoteIntegrityError`` when the bytes moved are not the ones expected.

    Args:
        what: "upload" or "download", for the message.
    """
    if got_size != expected_size or got_crc != expected_crc:
        raise RemoteIntegrityError(f"{what} of {key!r} ({local_path}): expected {expected_size} bytes with CRC-32C "
                                   f"{expected_crc:#010x}, {'read' if what == 'upload' else 'received'} {got_size} "
                                   f"bytes with CRC-32C {got_crc:#010x}")
