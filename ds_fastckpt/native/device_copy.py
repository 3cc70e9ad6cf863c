"""Bytes of tensors, from wherever they live, to a writer: CPU memory as it is, accelerator memory by DMA.

An accelerator storage reaches the writer through ``DeviceCopier``'s two
pinned blocks, copied on a side stream, the copy of one block overlapping the
write of the one before; nothing passes through pageable memory.
"""

import io
from typing import Dict, Union

import torch

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
        block_bytes: bytes per block.
    """

    def __init__(self, device: torch.device, block_bytes: int = DEVICE_BLOCK_BYTES):
        self.device = torch.device(device)
        self._module = torch.get_device_module(self.device)
        self._stream = self._module.Stream(self.device)
        self._blocks = [torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]

    def write(self, source: torch.Tensor, writer: io.RawIOBase) -> None:
        """Writes the bytes of ``source`` (uint8, on the device) to ``writer``; returns when the writer has taken
        the last block."""
        block_bytes = self._blocks[0].numel()
        # The side stream must see every kernel the training stream queued that writes this storage.
        self._stream.wait_stream(self._module.current_stream(self.device))
        in_flight = None
        for index, start in enumerate(range(0, source.numel(), block_bytes)):
            length = min(block_bytes, source.numel() - start)
            block = self._blocks[index % 2][:length]
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
        writer.write(block.numpy())  # copied into the writer's staging before write() returns: the block is free


def write_piece(piece: Union[bytes, torch.Tensor], writer, copiers: Dict[torch.device, DeviceCopier]) -> None:
    """Writes bytes, or a uint8 tensor from its own memory (by DMA through pinned blocks when on a device)."""
    if isinstance(piece, bytes):
        writer.write(piece)
    elif piece.device.type == "cpu":
        writer.write(piece.numpy())
    else:
        if piece.device not in copiers:
            copiers[piece.device] = DeviceCopier(piece.device)
        copiers[piece.device].write(piece, writer)


def wait_for_host_copies(sources) -> None:
    """Returns once every copy queued on the current streams of the devices ``sources`` (tensors or storages)
    live on has landed in host memory."""
    for device in {source.device for source in sources} - {torch.device("cpu")}:
        torch.get_device_module(device).current_stream(device).synchronize()


def host_copy_of_bytes(source: torch.Tensor) -> torch.Tensor:
    """A host copy of a uint8 tensor: pinned and copied by DMA (asynchronously) when it is on a device."""
    if source.device.type == "cpu":
        return source.clone()
    copy = torch.empty(source.numel(), dtype=torch.uint8, pin_memory=True)
    copy.copy_(source, non_blocking=True)
    return copy


def bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor viewing ``storage``'s bytes, without copying them."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
