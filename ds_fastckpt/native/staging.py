"""Aligned staging memory for the native writer, pinned on accelerator hosts."""

import threading

import torch

from ds_fastckpt.native.op import DIRECT_ALIGNMENT
from ds_fastckpt.native.tuning import check_io_buffer_size


class StagingBuffer:
    """Two halves of ``io_buffer_size`` bytes that a writer copies into while the other half is on its way to disk.

    On a CUDA (or other accelerator) host the memory is pinned through
    DeepSpeed's accelerator, so device-to-host copies into it are DMA; on a
    CPU-only host it is ordinary host memory. Either way the native op uses a
    4096-aligned window of it, as O_DIRECT requires.

    One buffer serves one writer at a time; reuse it across files to avoid
    allocating (and pinning) per file.

    Args:
        io_buffer_size: bytes per half; a positive multiple of 4096
            (``ds_fastckpt.native.tuning.IoBufferSize``).

    Raises:
        ValueError: if ``io_buffer_size`` is not a positive multiple of 4096 (a ``NotAllowed`` naming it).
        MemoryError: if the host cannot allocate (or pin) the two halves.
    """

    def __init__(self, io_buffer_size: int):
        self.io_buffer_size = check_io_buffer_size(io_buffer_size)
        nbytes = 2 * io_buffer_size + DIRECT_ALIGNMENT  # the slack lets the op start at a 4096-aligned address
        try:
            self.tensor = _allocate(nbytes)
        except (RuntimeError, MemoryError) as error:  # torch's CPU allocator and pinning raise RuntimeError
            raise MemoryError(f"cannot allocate the staging buffer for io_buffer_size={io_buffer_size}: "
                              f"{nbytes} bytes of host memory are needed ({error}); lower io_buffer_size") from error
        self._lock = threading.Lock()

    @property
    def pinned(self) -> bool:
        return self.tensor.is_pinned()

    def acquire(self) -> None:
        """Claims the buffer for one writer; raises RuntimeError if another writer holds it."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this StagingBuffer is already used by an open AioFileWriter; "
                               "close that writer first or give each writer its own buffer")

    def release(self) -> None:
        self._lock.release()


def _allocate(nbytes: int) -> torch.Tensor:
    from deepspeed.accelerator import get_accelerator

    host = torch.empty(nbytes, dtype=torch.uint8)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" or not accelerator.is_available():
        return host
    return accelerator.pin_memory(host)
