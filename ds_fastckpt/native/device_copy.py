"""Bytes of tensors, from wherever they live, to a writer: CPU memory as it is, accelerator memory by DMA.

An accelerator storage reaches the writer through ``DeviceCopier``'s two
pinned blocks, copied on a side stream, the copy of one block overlapping the
write of the one before; nothing passes through pageable memory. Each block
lands at an address that agrees with its file offset modulo
``DIRECT_ALIGNMENT``, so O_DIRECT writes it from there: a byte crosses host
memory once. Host copies (snapshots) are placed the same way.
"""

import io
from typing import Dict, Union

import torch

from ds_fastckpt.native.host_blocks import SNAPSHOT_BLOCKS
from ds_fastckpt.native.op import DIRECT_ALIGNMENT

# Bytes per block of an accelerator storage in flight to pinned memory: two blocks alternate, one being copied
# while the other is written.
DEVICE_BLOCK_BYTES = 16 << 20


class DeviceCopier:
    """Two pinned host blocks and a side stream: an accelerator storage goes to the writer block by block.

    The copy of block i+1 (DMA, on the side stream) runs while block i is
    handed to the writer. Made on first use and reused across files: pinning
    memory is slow.

    Args:
        device: the accelerator device of the storages it copies.
        block_bytes: bytes per pinned block; each carries up to ``block_bytes - DIRECT_ALIGNMENT`` of a storage.
    """

    def __init__(self, device: torch.device, block_bytes: int = DEVICE_BLOCK_BYTES):
        self.device = torch.device(device)
        self._module = torch.get_device_module(self.device)
        self._stream = self._module.Stream(self.device)
        # Each block carries DIRECT_ALIGNMENT bytes of slack, so that its bytes can start at the address their file
        # offset needs; kept inside block_bytes because torch's pinned allocator rounds sizes up to a power of two.
        self._chunk_bytes = block_bytes - DIRECT_ALIGNMENT
        self._blocks = [torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]

    def write(self, source: torch.Tensor, writer: io.RawIOBase) -> None:
        """Writes the bytes of ``source`` (uint8, on the device) to ``writer``; returns when the last block is on
        disk."""
        chunk_bytes, position = self._chunk_bytes, writer.tell()
        # The side stream must see every kernel the training stream queued that writes this storage.
        self._stream.wait_stream(self._module.current_stream(self.device))
        in_flight = None
        for index, start in enumerate(range(0, source.numel(), chunk_bytes)):
            length = min(chunk_bytes, source.numel() - start)
            block = _congruent(self._blocks[index % 2], position + start, length)
            with self._module.stream(self._stream):
                block.copy_(source[start:start + length], non_blocking=True)
                copied = self._module.Event()
                copied.record(self._stream)
            if in_flight is not None:
                self._hand_over(in_flight, writer)
            in_flight = (copied, block)
        if in_flight is not None:
            self._hand_over(in_flight, writer)
        # The training stream may free or reuse the storage once its copies have been read.
        source.record_stream(self._stream)

    @staticmethod
    def _hand_over(in_flight, writer: io.RawIOBase) -> None:
        copied, block = in_flight
        copied.synchronize()
        writer.write_in_place(block.numpy(), until_written=True)  # on disk when this returns: the block is free


def write_piece(piece: Union[bytes, torch.Tensor], writer, copiers: Dict[torch.device, DeviceCopier]) -> None:
    """Writes bytes, or a uint8 tensor from its own memory (by DMA through pinned blocks when on a device).

    The tensor's memory must not change until the writer is closed: O_DIRECT reads it from there.
    """
    if isinstance(piece, bytes):
        writer.write(piece)
    elif piece.device.type == "cpu":
        writer.write_in_place(piece)
    else:
        if piece.device not in copiers:
            copiers[piece.device] = DeviceCopier(piece.device)
        copiers[piece.device].write(piece, writer)


def wait_for_host_copies(sources) -> None:
    """Returns once every copy queued on the current streams of the devices ``sources`` (tensors or storages)
    live on has landed in host memory."""
    for device in {source.device for source in sources} - {torch.device("cpu")}:
        torch.get_device_module(device).current_stream(device).synchronize()


def host_copy_of_bytes(source: torch.Tensor, file_offset: int) -> torch.Tensor:
    """A host copy of a uint8 tensor, placed so O_DIRECT writes it to ``file_offset`` from where it lies: pinned
    and copied by DMA (asynchronously) when ``source`` is on a device (torch's pinned allocator caches the
    memory), else copied into a block ``SNAPSHOT_BLOCKS`` keeps for the next snapshot."""
    nbytes = source.numel() + DIRECT_ALIGNMENT
    if source.device.type != "cpu":
        copy = _congruent(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), file_offset, source.numel())
        return copy.copy_(source, non_blocking=True)
    block = SNAPSHOT_BLOCKS.take(nbytes)
    copy = SNAPSHOT_BLOCKS.lend(block, _congruent_start(block, file_offset), source.numel())
    return copy.copy_(source)


def _congruent(block: torch.Tensor, file_offset: int, length: int) -> torch.Tensor:
    """``length`` bytes of ``block`` (``DIRECT_ALIGNMENT`` longer) at an address congruent to ``file_offset``."""
    start = _congruent_start(block, file_offset)
    return block[start:start + length]


def _congruent_start(block: torch.Tensor, file_offset: int) -> int:
    return (file_offset - block.data_ptr()) % DIRECT_ALIGNMENT


def bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor viewing ``storage``'s bytes, without copying them."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
