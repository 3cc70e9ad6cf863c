"""The thin async layer: one named writer thread running the synchronous file writes, and the wait for them.

As in PyTorch DCP's async save, a one-worker executor runs the same write
function the synchronous path calls and hands back Futures; nothing here
knows how a file is written.
"""

import concurrent.futures
import io
import logging
import time
from typing import Any, Callable, List, Optional, Tuple, Union

import torch

from ds_fastckpt.native.file_part import FilePart, SnapshotTooLargeError
from ds_fastckpt.native.layout_save import Layout, lay_out, layout_first_supported
from ds_fastckpt.native.writer import torch_zip_crc32

logger = logging.getLogger(__name__)

THREAD_NAME = "ds_fastckpt-writer"
REMOVER_THREAD_NAME = "ds_fastckpt-remover"


class BackgroundWriterError(RuntimeError):
    """The background writer did not finish in time: it is hung or its thread died."""


class BackgroundWriter:
    """Runs file writes (or removals) one at a time on one named thread, in submission order.

    Args:
        thread_name: ``ds_fastckpt-writer`` for async saves, ``ds_fastckpt-remover`` for background deletion.
    """

    def __init__(self, thread_name: str = THREAD_NAME):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    def submit(self, write: Callable[..., Any], *args) -> concurrent.futures.Future:
        """Queues ``write(*args)``; once the interpreter has begun to exit, runs it here and returns it done.

        ``concurrent.futures`` refuses new work from the moment the interpreter's exit begins (its own hook runs
        before ``atexit``'s), yet the commit of a checkpoint in flight at exit still rotates, and rotation hands
        its removal here: refusing it would leave that checkpoint uncommitted.
        """
        try:
            return self._executor.submit(write, *args)
        except RuntimeError:
            if not concurrent.futures.thread._shutdown:  # this writer was shut down: a caller's bug, not the exit
                raise
        done = concurrent.futures.Future()
        try:
            done.set_result(write(*args))
        except Exception as error:  # the caller reads it from the future, as from the writer thread
            done.set_exception(error)
        return done

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def wait_for(futures: List[concurrent.futures.Future], timeout_s: float,
             what: str) -> Tuple[List[Any], Optional[BaseException]]:
    """Results of ``futures`` in order, and the first failure (None when all succeeded).

    Every future is waited for (up to ``timeout_s`` in all) even after a
    failure, so no write of this checkpoint is still running when the caller
    reports the error. A write that raised gives its own exception, errno and
    path intact; one still running at the deadline gives a BackgroundWriterError.
    """
    deadline = time.monotonic() + timeout_s
    results, failure = [], None
    for future in futures:
        try:
            results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
        except concurrent.futures.TimeoutError:
            failure = failure or BackgroundWriterError(
                f"the background writer did not finish {what} within {timeout_s} s: it is hung or its thread "
                "died; the checkpoint is not committed (checkpoint.fast_aio.async_timeout_s sets the limit)")
        except Exception as error:  # handed to the caller, who raises it on the training thread
            failure = failure or error
    return results, failure


def snapshot(state_dict, limit_bytes: int = 0) -> Union[Layout, FilePart, bytes]:
    """``state_dict`` as it is now, in host memory, for a write that must not see later changes.

    Its layout with every storage copied (``Layout.snapshot``: accelerator
    tensors by DMA into pinned memory); serialized bytes where the layout needs
    data it leaves out (torch's zip CRC32 on). A ``FilePart`` (this rank's
    share of a shared file) is copied the same way.

    Raises:
        SnapshotTooLargeError: when the storages exceed ``limit_bytes`` (0: no limit); nothing was copied.
    """
    if isinstance(state_dict, FilePart):
        return state_dict.snapshot(limit_bytes)
    if layout_first_supported():
        return lay_out(state_dict).snapshot(limit_bytes)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    if limit_bytes and buffer.tell() > limit_bytes:
        raise SnapshotTooLargeError(f"a snapshot of {buffer.tell()} bytes exceeds the limit of {limit_bytes} bytes")
    return buffer.getvalue()


def budgeted_snapshot(state_dict, limit_bytes: int, used_bytes: int) -> Tuple[Union[Layout, FilePart, bytes], int]:
    """``snapshot(state_dict)`` within what ``used_bytes`` left of ``limit_bytes`` (0: no limit), and its size.

    Raises:
        SnapshotTooLargeError: when it does not fit, also when nothing is left; nothing was copied.
    """
    left = limit_bytes - used_bytes
    if limit_bytes and left <= 0:  # snapshot() reads a limit of 0 as none at all
        raise SnapshotTooLargeError(f"this checkpoint's snapshots already took all {limit_bytes} bytes")
    copy = snapshot(state_dict, left if limit_bytes else 0)
    return copy, copy.storage_bytes if isinstance(copy, (Layout, FilePart)) else len(copy)


def snapshot_or_original(state_dict, tag: str, limit_bytes: int, used_bytes: int, torch_crc32: bool):
    """``budgeted_snapshot`` of ``state_dict`` and its size; ``(state_dict, 0)`` with a warning when it does not fit
    (the caller then writes it before returning). ``torch_crc32``: the engine's option, which decides the layout."""
    try:
        with torch_zip_crc32(torch_crc32):
            return budgeted_snapshot(state_dict, limit_bytes, used_bytes)
    except SnapshotTooLargeError as error:
        logger.warning("checkpoint %r: %d bytes left of snapshot_max_bytes=%d; writing this file now, with "
                       "training waiting for it (%s)", tag, limit_bytes - used_bytes, limit_bytes, error)
        return state_dict, 0
