"""One writer's part of a file that several ranks write together (``parallel_writers``)."""

import bisect
from typing import Dict, List, Optional, Tuple, Union

import torch

from ds_fastckpt.native.device_copy import DeviceCopier, bytes_of, host_copy_of_bytes, wait_for_host_copies, write_piece


class SnapshotTooLargeError(MemoryError):
    """A snapshot would need more host memory than the limit allows; nothing was copied."""


class FilePart:
    """The part of a file one of several writers writes: pieces at their file offsets, in order; the bytes
    between them are other writers' (``parallel_writers``).

    Args:
        pieces: ``(offset, bytes or uint8 tensor)`` in file order, not overlapping.
        file_size: the size of the whole file.
    """

    def __init__(self, pieces: List[Tuple[int, Union[bytes, torch.Tensor]]], file_size: int):
        self.pieces = pieces
        self.file_size = file_size

    @classmethod
    def of_storages(cls, storages: List[torch.UntypedStorage], starts: List[int], ranges: List[Tuple[int, int]],
                    file_size: int) -> "FilePart":
        """The bytes of ``ranges`` from ``storages``, storage i lying at file offset ``starts[i]``.

        Raises:
            ValueError: for a range not inside one storage.
        """
        pieces = []
        for start, end in ranges:
            index = bisect.bisect_right(starts, start) - 1
            if index < 0 or end > starts[index] + storages[index].nbytes():
                raise ValueError(f"bytes {start}-{end} of the file are not inside one storage")
            pieces.append((start, bytes_of(storages[index])[start - starts[index]:end - starts[index]]))
        return cls(pieces, file_size)

    @property
    def storage_bytes(self) -> int:
        return sum(piece.numel() for _, piece in self.pieces if not isinstance(piece, bytes))

    def snapshot(self, limit_bytes: int = 0) -> "FilePart":
        """The same part with its tensor bytes copied to host memory now; see ``Layout.snapshot``."""
        if limit_bytes and self.storage_bytes > limit_bytes:
            raise SnapshotTooLargeError(f"a snapshot of {self.storage_bytes} bytes exceeds the limit of "
                                        f"{limit_bytes} bytes")
        copies = [(offset, piece if isinstance(piece, bytes) else host_copy_of_bytes(piece, offset))
                  for offset, piece in self.pieces]
        wait_for_host_copies([piece for _, piece in self.pieces if not isinstance(piece, bytes)])
        return FilePart(copies, self.file_size)

    def write_to(self, writer, device_copiers: Optional[Dict[torch.device, DeviceCopier]] = None) -> None:
        """Writes each piece at its offset through a shared ``AioFileWriter``, skipping what lies between.

        Raises:
            OSError: from the writer, with errno and path.
        """
        copiers = {} if device_copiers is None else device_copiers
        for offset, piece in self.pieces:
            if offset > writer.tell():
                writer.skip(offset - writer.tell())
            write_piece(piece, writer, copiers)
