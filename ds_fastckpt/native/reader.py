"""Fast loads: a whole file read with O_DIRECT, several large reads in flight, then deserialized from memory."""

import io
import os

import torch

from ds_fastckpt.native.op import DIRECT_ALIGNMENT, load_op
from ds_fastckpt.native.tuning import DEFAULT_TUNING


def read_file(path, *, block_size: int = DEFAULT_TUNING.block_size,
              queue_depth: int = DEFAULT_TUNING.queue_depth) -> memoryview:
    """The bytes of ``path``, read with libaio + O_DIRECT into aligned host memory.

    Bypassing the page cache with ``queue_depth`` reads of ``block_size``
    bytes in flight reads a cold file faster than buffered reads with the
    kernel's readahead. Falls back to buffered reads where O_DIRECT is refused.

    Raises:
        OSError: with errno and path (FileNotFoundError, PermissionError, EIO, ...).
    """
    reader, data = start_reading(path, block_size, queue_depth)
    reader.finish()
    return data


def start_reading(path, block_size: int = DEFAULT_TUNING.block_size, queue_depth: int = DEFAULT_TUNING.queue_depth):
    """Starts reading ``path`` with O_DIRECT; returns the op's reader and a view of the bytes as they arrive.

    Call ``reader.wait(begin, end)`` before using a range of the view and ``reader.finish()`` once done
    (it waits for the rest and closes the file).

    Raises:
        OSError: with errno and path.
    """
    path = os.fspath(path)
    size = os.stat(path).st_size
    padded = -(-size // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
    buffer = torch.empty(padded + DIRECT_ALIGNMENT, dtype=torch.uint8)
    reader = load_op().FileReader(path, buffer, block_size, queue_depth)
    start = -buffer.data_ptr() % DIRECT_ALIGNMENT
    return reader, memoryview(buffer.numpy())[start:start + reader.size]


class MemoryFile(io.RawIOBase):
    """A read-only, seekable file over a bytes-like object, without copying it.

    ``torch.load`` reads each record with ``readinto``, so the only copy is
    the one into the tensor storages. ``wait(begin, end)``, when given, is
    called before bytes are copied out, for data still arriving.
    """

    def __init__(self, data, wait=None):
        super().__init__()
        self._data = memoryview(data).cast("B")
        self._position = 0
        self._wait = wait

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        target = memoryview(target).cast("B")
        count = max(0, min(len(target), len(self._data) - self._position))
        if self._wait is not None:
            self._wait(self._position, self._position + count)
        target[:count] = self._data[self._position:self._position + count]
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._data)}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position
