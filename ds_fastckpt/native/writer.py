"""``AioFileWriter``: a write-only file object that ``torch.save`` writes through libaio + O_DIRECT."""

import contextlib
import io
import logging
import os
import threading
from typing import Optional

import torch
from torch.serialization import get_crc32_options, set_crc32_options

from ds_fastckpt.native.op import DIRECT_ALIGNMENT, load_op
from ds_fastckpt.native.staging import StagingBuffer
from ds_fastckpt.native.tuning import DEFAULT_IO_BUFFER_SIZE, DEFAULT_TUNING, check_tuning

logger = logging.getLogger(__name__)

_warned_buffered_dirs = set()

# The smallest source write_in_place() can write any of uncopied: a body of 64 KiB (csrc/aio_writer.cpp
# kMinInPlaceBytes) after an edge of up to one block.
MIN_IN_PLACE_BYTES = (64 << 10) + DIRECT_ALIGNMENT


@contextlib.contextmanager
def torch_zip_crc32(enabled: bool):
    """Sets torch's process-wide zip CRC32 switch for the block and restores it after.

    ``torch.save`` computes that CRC on the calling thread (about 2 GB/s here) and ``torch.load``
    never checks it; the op's own CRC-32C covers every byte written through AioFileWriter.
    """
    previous = get_crc32_options()
    set_crc32_options(enabled)
    try:
        yield
    finally:
        set_crc32_options(previous)


class AioFileWriter(io.RawIOBase):
    """A write-only, non-seekable file whose bytes go to disk through libaio with O_DIRECT.

    ``torch.save(obj, AioFileWriter(path))`` writes exactly the bytes
    ``torch.save(obj, io.BytesIO())`` would, and ``torch.load(path)`` reads
    them back. Opening truncates an existing file.

    Data is copied into a staging half; a full half is written with
    ``queue_depth`` requests of ``block_size`` bytes in flight while the next
    half fills. ``write_in_place`` skips that copy for memory O_DIRECT can
    write from. ``flush()`` writes nothing: O_DIRECT cannot write a partial
    block before the end of the file is known, so bytes reach the file when a
    half fills and at ``close()``. ``close()`` writes the rest, fsyncs (unless
    ``fsync=False``) and closes the descriptor; when it returns the file is
    durable.

    The first I/O error closes the descriptor at once and is kept: later
    writes are discarded, and ``flush()`` and the first ``close()`` raise it
    as an ``OSError`` with errno and path. ``torch.save`` keeps writing after
    a failed write and then fails on its own zip bookkeeping; it does call
    ``flush()`` at the end, which is where it gets the real error. A failed
    fsync is never retried into a false success. An exception inside a
    ``with`` block abandons the file: descriptor closed, no fsync.

    The op computes a CRC-32C of the bytes as they go to disk, on the
    calling thread: in the same pass as the copy into staging, and for bytes
    written in place while the disk writes them; ``checksum`` returns it after
    ``close()``.

    A writer dropped without ``close()`` closes its descriptor without fsync.
    Like other raw file objects, a writer is used by one thread at a time: a
    call made while another thread is inside ``write()``, ``close()`` or
    ``tell()`` raises ``RuntimeError`` and changes nothing (the op runs with
    the GIL released, so the two would otherwise be inside it at once).
    If the filesystem refuses O_DIRECT, the file is written buffered and
    fsynced, with one warning per directory.

    The sizes and depth are checked against their declarations in
    ``ds_fastckpt.native.tuning`` (``AioTuning``, ``IoBufferSize``).

    Args:
        path: file to create or truncate.
        io_buffer_size: bytes per staging half (two halves are used); a
            positive multiple of 4096. Defaults to ``staging.io_buffer_size``
            when a staging buffer is given, else ``DEFAULT_IO_BUFFER_SIZE``
            (16 MiB).
        queue_depth: libaio requests in flight; 1 to ``MAX_QUEUE_DEPTH`` (65536).
            Defaults to DeepSpeed's ``aio.queue_depth`` default.
        block_size: bytes per request; a positive multiple of 4096. Defaults
            to DeepSpeed's ``aio.block_size`` default.
        fsync: fsync before closing, so the file survives a power loss.
        staging: a ``StagingBuffer`` to reuse across writers; by default each
            writer allocates its own.
        overwrite: write over the blocks of the file already at ``path``
            instead of truncating it (what is left past the new end is cut at
            ``close()``): no block allocation, no freeing. Only for a file
            nothing else holds (see ``Storage.take_for_overwrite``).
        shared: write ranges of a file that another process made and sized
            and that other writers fill at the same time (data-parallel
            writers): the file must exist, is never created, truncated or
            resized, and ``skip()`` passes over the ranges others write.

    Raises:
        ValueError: for a size or depth that is not allowed (a ``NotAllowed`` naming the argument).
        OSError: when the file cannot be created (errno and path kept).
    """

    def __init__(self,
                 path,
                 *,
                 io_buffer_size: Optional[int] = None,
                 queue_depth: int = DEFAULT_TUNING.queue_depth,
                 block_size: int = DEFAULT_TUNING.block_size,
                 fsync: bool = True,
                 staging: Optional[StagingBuffer] = None,
                 overwrite: bool = False,
                 shared: bool = False):
        super().__init__()
        self._native = None
        self._busy = threading.Lock()  # held by the one thread inside the op; see _claim
        self._running = ""
        self._error: Optional[OSError] = None
        self._finished = False
        self._held = []  # sources of write_in_place(), which the disk reads until close()
        self.name = os.fspath(path)
        if staging is None:
            staging = StagingBuffer(DEFAULT_IO_BUFFER_SIZE if io_buffer_size is None else io_buffer_size)
        elif io_buffer_size is not None and io_buffer_size != staging.io_buffer_size:
            raise ValueError(f"io_buffer_size={io_buffer_size!r} is not allowed with a staging buffer of "
                             f"{staging.io_buffer_size} bytes per half: leave it out or make them equal")
        if overwrite and shared:
            raise ValueError("overwrite=True and shared=True are not allowed together: a shared file is written in "
                             "place already")
        tuning = check_tuning(block_size=block_size, queue_depth=queue_depth)
        self._staging = staging
        staging.acquire()
        try:
            self._native = load_op().AioWriter(self.name, staging.tensor, staging.io_buffer_size, tuning.block_size,
                                               tuning.queue_depth, bool(fsync),
                                               "shared" if shared else "overwrite" if overwrite else "truncate")
        except BaseException:
            staging.release()
            raise
        if not self._native.is_direct:
            _warn_buffered(self.name)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self.bytes_written

    def write(self, data) -> int:
        self._checkClosed()
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError("AioFileWriter.write() needs a C-contiguous bytes-like object")
        self._run("write", data)
        return view.nbytes

    def write_in_place(self, data, *, until_written: bool = False) -> int:
        """Writes ``data`` (bytes-like, or a contiguous CPU uint8 tensor) like ``write()``, from its own memory
        where O_DIRECT allows: no staging copy.

        When the address of ``data`` and the position agree modulo
        ``memory_alignment``, its whole blocks go to disk straight from it and
        are hashed while the disk writes them; its unaligned edges, and all of
        a source that does not agree or is under 64 KiB, are copied like
        ``write()``. The writer holds ``data`` until ``close()``: its bytes
        must not change before then. With ``until_written``, this returns once
        they are on disk instead, and ``data`` is free again (a reused block).

        Raises:
            ValueError: for a buffer that is not C-contiguous.
        """
        self._checkClosed()
        buffer = data.numpy() if isinstance(data, torch.Tensor) else data
        view = memoryview(buffer)
        if not view.c_contiguous:
            raise ValueError("AioFileWriter.write_in_place() needs a C-contiguous bytes-like object")
        if not until_written:
            # The object given, not the array made of it: a tensor's numpy() does not keep that tensor alive, and
            # a snapshot block goes back to its cache when its tensor goes (host_blocks).
            self._held.append(data)
        self._run("write_in_place", buffer, until_written)
        return view.nbytes

    @property
    def memory_alignment(self) -> int:
        """The modulus that a source's address and the position must agree in for ``write_in_place`` to skip the
        copy: the kernel's ``stx_dio_mem_align`` for this file (512 on a virtio disk, often 4 on NVMe), 1 when the
        file is written buffered, and 4096 where the kernel does not say."""
        return self._native.memory_alignment

    def skip(self, size: int) -> int:
        """Moves the position ``size`` bytes forward without writing them (another writer writes them).

        Ends a segment (see ``segments``). Returns the new position.

        Raises:
            ValueError: when the position or ``size`` is not a multiple of ``DIRECT_ALIGNMENT`` (4096).
        """
        self._checkClosed()
        alignment = load_op().DIRECT_ALIGNMENT
        position = self.bytes_written
        if size < 0 or size % alignment or position % alignment:
            raise ValueError(f"AioFileWriter.skip({size}) at position {position} of {self.name}: the position and "
                             f"the size must be non-negative multiples of {alignment}")
        self._run("skip", size)
        return position + size

    def flush(self) -> None:
        self._checkClosed()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self.closed:
            return
        self._claim("close")  # before anything is released: a write running elsewhere still uses the staging
        try:
            if self._error is not None:
                raise self._error
            self._native.close()
            self._finished = True
        finally:
            try:
                self._release()
            finally:
                self._busy.release()

    @property
    def is_direct(self) -> bool:
        """False when the filesystem refused O_DIRECT and the file is written buffered."""
        return self._native.is_direct

    @property
    def bytes_written(self) -> int:
        """The position: bytes accepted and skipped so far; after a successful ``close()`` without skips, the
        size of the file."""
        self._claim("bytes_written")
        try:
            return self._native.bytes_written
        finally:
            self._busy.release()

    @property
    def bytes_in_place(self) -> int:
        """Of ``bytes_written``, those ``write_in_place`` sent to disk straight from their own memory, uncopied."""
        self._claim("bytes_in_place")
        try:
            return self._native.bytes_in_place
        finally:
            self._busy.release()

    @property
    def checksum(self) -> int:
        """CRC-32C of every byte written (the whole file's when nothing was skipped), computed on the way to disk.

        Raises:
            ValueError: before ``close()`` has returned successfully.
        """
        if not self._finished:
            raise ValueError(f"the checksum of {self.name} is known only after a successful close()")
        return self._native.checksum

    @property
    def segments(self):
        """``(offset, length, crc32c)`` of each run of bytes written between skips, in file order.

        Raises:
            ValueError: before ``close()`` has returned successfully.
        """
        if not self._finished:
            raise ValueError(f"the segments of {self.name} are known only after a successful close()")
        return [tuple(segment) for segment in self._native.segments]

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        elif not self.closed:
            self._abandon()
        return False

    def __del__(self):
        if self._native is not None and not self.closed:
            self._abandon()

    def _run(self, call: str, *args) -> None:
        """Runs the op's ``call``; its first I/O error is kept (see the class docstring), not raised here."""
        self._claim(call)
        try:
            if self._error is None:
                try:
                    getattr(self._native, call)(*args)
                except OSError as error:
                    self._error = error  # the op has already closed the descriptor
        finally:
            self._busy.release()

    def _claim(self, call: str) -> None:
        """Marks ``call`` as the one running, or refuses it while another thread is inside this writer.

        Refuses rather than waits: two threads taking turns would interleave their bytes into one file that
        loads as garbage, so concurrent use is a bug to report, not to serialize.

        Raises:
            RuntimeError: naming both calls; nothing has changed.
        """
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(f"AioFileWriter.{call}() on {self.name} was called while {self._running}() is running "
                               f"on another thread: a writer is used by one thread at a time; finish (join) that "
                               f"call first")
        self._running = call

    def _abandon(self) -> None:
        self._native.abort()  # waits for a call still running on another thread, then closes without fsync
        self._release()

    def _release(self) -> None:
        self._held.clear()
        self._staging.release()
        super().close()


def _warn_buffered(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in _warned_buffered_dirs:
        _warned_buffered_dirs.add(directory)
        logger.warning("The filesystem of %s does not support O_DIRECT; writing there with buffered I/O and "
                       "fsync instead, which is slower.", directory)
