"""``torch.save`` laid out first, then filled: every storage's bytes go from its own memory to the writer.

``torch.save`` into a file object copies each storage twice before a byte
reaches disk: a CUDA storage through ``storage.cpu()`` into pageable memory,
one storage at a time, and every storage through the serializer's write
callback. torch also lets a save lay the archive out without its data: under
``torch.serialization.skip_data()`` it writes every header and the pickle,
and skips each storage's bytes with ``seek(nbytes, SEEK_CUR)`` on the file
object. ``lay_out`` records that as a ``Layout``: the few small byte pieces,
and which storage fills each skipped range. ``Layout.write_to`` then writes
the file in order, each storage straight from its own memory: a CPU storage
as one zero-copy view, an accelerator storage in blocks copied by DMA into
pinned memory on a side stream, each block's copy overlapping the write of
the one before. ``Layout.snapshot`` copies the storages to host memory first,
for a write that runs later on another thread. The file is byte for byte
what ``torch.save`` writes: a plain torch.save file every tool reads.

torch writes storages in the order its pickler first meets them; a first
pickling pass here meets them in the same order (same pickle module, protocol
and rule: one entry per untyped storage); as a safety net, every skipped
range must have the size of the storage that fills it.

The zip CRC32 of a record is computed from the data torch writes, which
skip_data leaves out: with torch's CRC32 on, the engine uses plain
``torch.save`` (see ``layout_first_supported``).
"""

import io
import pickle
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX
from torch.serialization import DEFAULT_PROTOCOL, get_crc32_options

from ds_fastckpt.native.device_copy import DeviceCopier, bytes_of, host_copy_of_bytes, wait_for_host_copies, write_piece
from ds_fastckpt.native.file_part import FilePart, SnapshotTooLargeError
from ds_fastckpt.native.writer import MIN_IN_PLACE_BYTES
from ds_fastckpt.native.zip_padding import piece_length, repad


class LayoutMismatchError(RuntimeError):
    """torch skipped a range that is not the next storage's size: nothing is written from such a layout."""


def layout_first_supported() -> bool:
    """Whether this torch can lay a save out first (``skip_data``) and zip CRC32 is off (it needs the data)."""
    return hasattr(torch.serialization, "skip_data") and not get_crc32_options()


class Layout:
    """A ``torch.save`` file as torch lays it out: its pieces in file order, bytes or the storage that fills a range.

    The bytes (headers, the pickle, the central directory) are small and
    copied; a storage piece is the storage itself until ``snapshot`` replaces
    it with a host copy.
    """

    def __init__(self, pieces: List[Union[bytes, torch.UntypedStorage]]):
        self.pieces = pieces

    @property
    def storage_bytes(self) -> int:
        return sum(piece_length(piece) for piece in self.pieces if not isinstance(piece, bytes))

    def snapshot(self, limit_bytes: int = 0) -> "Layout":
        """The same layout with every storage copied to host memory now: later changes to the tensors do not show.

        Accelerator storages are copied by DMA into pinned memory (torch's
        caching host allocator reuses it across saves); this returns once
        every copy has landed. CPU storages are copied with memcpy. Each copy
        lies at an address that agrees with its file offset modulo
        ``DIRECT_ALIGNMENT``: the file is torch.save's, and O_DIRECT writes
        every copy from where it lies.

        Args:
            limit_bytes: refuse a snapshot of more storage bytes than this; 0 sets no limit.

        Raises:
            SnapshotTooLargeError: before copying anything, when ``limit_bytes`` is exceeded.
        """
        if limit_bytes and self.storage_bytes > limit_bytes:
            raise SnapshotTooLargeError(f"a snapshot of {self.storage_bytes} bytes exceeds the limit of "
                                        f"{limit_bytes} bytes")
        copies, offset = [], 0
        for piece in self.pieces:
            copies.append(piece if isinstance(piece, bytes) else host_copy_of_bytes(bytes_of(piece), offset))
            offset += piece_length(piece)
        wait_for_host_copies([piece for piece in self.pieces if not isinstance(piece, bytes)])
        return Layout(copies)

    @property
    def file_size(self) -> int:
        return sum(piece_length(piece) for piece in self.pieces)

    def storage_ranges(self, storages: List[torch.UntypedStorage]) -> List[Tuple[int, int]]:
        """``[start, end)`` in the file of each of ``storages`` (the same storages, not copies), in their order."""
        starts, offset = {}, 0
        for piece in self.pieces:
            if not isinstance(piece, bytes):
                starts[piece._cdata] = offset
            offset += piece_length(piece)
        return [(starts[storage._cdata], starts[storage._cdata] + storage.nbytes()) for storage in storages]

    def part_without(self, ranges: List[Tuple[int, int]]) -> "FilePart":
        """The file's bytes outside ``ranges`` (sorted, not overlapping): what is left for one writer."""
        pieces, offset, first_gap = [], 0, 0
        for piece in self.pieces:
            end = offset + piece_length(piece)
            while first_gap < len(ranges) and ranges[first_gap][1] <= offset:
                first_gap += 1
            position = offset
            for gap_start, gap_end in ranges[first_gap:]:
                if gap_start >= end:
                    break
                if gap_start > position:
                    pieces.append((position, _slice(piece, position - offset, gap_start - offset)))
                position = max(position, gap_end)
            if position < end:
                pieces.append((position, _slice(piece, position - offset, end - offset)))
            offset = end
        return FilePart(pieces, self.file_size)

    def write_to(self, writer: io.RawIOBase,
                 device_copiers: Optional[Dict[torch.device, DeviceCopier]] = None) -> None:
        """Writes the file to ``writer``: each storage from its own memory, no serializer copy.

        Each CPU storage's record is first padded so that its bytes lie in the
        file where O_DIRECT writes them from their own memory (``zip_padding``;
        a file that needs it is no longer byte for byte torch.save's).

        Args:
            writer: an ``AioFileWriter``.
            device_copiers: the ``DeviceCopier`` of each accelerator device, kept by the caller to reuse
                across files (pinning is slow); one is added for a device met without one.

        Raises:
            OSError: from the writer, with errno and path.
        """
        copiers = {} if device_copiers is None else device_copiers
        pieces = repad(self.pieces, writer.memory_alignment, _host_address) or self.pieces
        for piece in pieces:
            write_piece(piece if isinstance(piece, (bytes, torch.Tensor)) else bytes_of(piece), writer, copiers)


def parameter_storages(state_dict, per_rank: Sequence[torch.Tensor] = ()) -> List[torch.UntypedStorage]:
    """The storages of the module parameters in a DeepSpeed model-states dict, in save order.

    These are what data-parallel ranks may hold identically. Left out: buffers
    (``buffer_names``, such as batch-norm statistics), modules' extra state
    (``get_extra_state()``, keys ending in torch's ``_extra_state``, such as
    FP8 scaling metadata), and any parameter storage that one of those also
    views; they, ``client_state`` and everything else outside ``module`` may
    differ between ranks.

    Args:
        state_dict: the dict DeepSpeed saves into the model-states file.
        per_rank: parameters each rank holds its own of (DeepSpeed marks them ``ds_optim_param``:
            ``OptimizedLinear``'s sharded base weights); their storages are left out too.
    """
    module = state_dict.get("module") if isinstance(state_dict, dict) else None
    if not isinstance(module, dict):
        return []
    buffers = set(state_dict.get("buffer_names") or ())
    parameters, others = {}, []
    for name, value in module.items():
        if name in buffers or _is_extra_state(name):
            others.append(value)
        elif isinstance(value, torch.Tensor):
            parameters[name] = value
    not_parameters = {storage._cdata for storage in _storages_of_tensors_in([*others, *per_rank])}
    return [storage for storage in storages_in_save_order(parameters)
            if storage.nbytes() and storage._cdata not in not_parameters]


def _is_extra_state(key: str) -> bool:
    """Whether a ``state_dict`` key holds a module's ``get_extra_state()`` (``prefix + "_extra_state"``)."""
    return key.rpartition(".")[2] == _EXTRA_STATE_KEY_SUFFIX


def _storages_of_tensors_in(values) -> Iterator[torch.UntypedStorage]:
    """The untyped storages of the tensors in ``values``, also inside lists, tuples and dicts (extra state is any
    object); nothing is pickled, so an object that cannot be is no error here."""
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value.untyped_storage()
        elif isinstance(value, dict):
            yield from _storages_of_tensors_in(value.values())
        elif isinstance(value, (list, tuple)):
            yield from _storages_of_tensors_in(value)


def lay_out(obj) -> Layout:
    """How ``torch.save(obj)`` lays its file out, with no storage byte copied.

    Raises:
        LayoutMismatchError: when torch's layout disagrees with the storages found (a torch change).
    """
    with torch.serialization.skip_data():
        recorder = _LayoutRecorder(storages_in_save_order(obj))
        try:
            torch.save(obj, recorder)
        except Exception:
            # torch finishes the archive on the way out, and its own position check then fails: ours is the cause
            if recorder.mismatch is not None:
                raise recorder.mismatch from None
            raise
    return recorder.finish()


def save_layout_first(obj, writer: io.RawIOBase,
                      device_copiers: Optional[Dict[torch.device, DeviceCopier]] = None) -> None:
    """``torch.save(obj, writer)``, each storage written from its own memory (plain torch.save where unsupported).

    See ``Layout.write_to`` for the arguments and errors.
    """
    if layout_first_supported():
        lay_out(obj).write_to(writer, device_copiers)
    else:
        torch.save(obj, writer)


def storages_in_save_order(obj) -> List[torch.UntypedStorage]:
    """The untyped storages of ``obj``, each once, in the order ``torch.save`` writes their records."""
    found: List[torch.UntypedStorage] = []
    keys = {}

    class _StorageFinder(pickle.Pickler):
        def persistent_id(self, value):
            if isinstance(value, torch.storage.TypedStorage):
                storage = value._untyped_storage
            elif torch.is_storage(value):
                storage = value
            else:
                return None
            if storage._cdata not in keys:
                keys[storage._cdata] = len(found)
                found.append(storage)
            return keys[storage._cdata]

    _StorageFinder(_Discard(), protocol=DEFAULT_PROTOCOL).dump(obj)
    return found


class _LayoutRecorder(io.RawIOBase):
    """The file object torch.save lays the file out on: bytes are kept, each skipped range names its storage."""

    def __init__(self, storages: List[torch.UntypedStorage]):
        super().__init__()
        self._storages: Iterator[torch.UntypedStorage] = iter(storages)
        self._pieces: List[Union[bytes, torch.UntypedStorage]] = []
        self._position = 0
        self.mismatch: Optional[LayoutMismatchError] = None  # the first, kept past torch's own error

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        piece = bytes(data)  # torch reuses its buffer after the call
        self._pieces.append(piece)
        self._position += len(piece)
        return len(piece)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            if whence != io.SEEK_CUR or offset <= 0:
                raise LayoutMismatchError(f"torch.save moved by ({offset}, {whence}) while laying out a file; only "
                                          "a forward skip over a storage's bytes is expected")
            storage = self._next_storage(offset)
        except LayoutMismatchError as error:
            self.mismatch = self.mismatch or error
            raise
        self._pieces.append(storage)
        self._position += offset
        return self._position

    def tell(self) -> int:
        return self._position

    def finish(self) -> Layout:
        """The layout recorded, once every storage with bytes has its range."""
        left = [storage for storage in self._storages if storage.nbytes()]
        if left:
            raise LayoutMismatchError(f"torch.save gave no range to {len(left)} storage(s) while laying out a file")
        return Layout(self._pieces)

    def _next_storage(self, nbytes: int) -> torch.UntypedStorage:
        for storage in self._storages:
            if storage.nbytes() == 0:
                continue  # torch writes no bytes, and skips none, for an empty storage
            if storage.nbytes() != nbytes:
                raise LayoutMismatchError(f"torch.save skipped {nbytes} bytes where the next storage has "
                                          f"{storage.nbytes()}")
            return storage
        raise LayoutMismatchError(f"torch.save skipped {nbytes} bytes after the last storage")


class _Discard:
    """A write-only sink: the finder pass needs the pickler's traversal, not its bytes."""

    def write(self, data) -> int:
        return len(data)


def _slice(piece: Union[bytes, torch.UntypedStorage], start: int, end: int) -> Union[bytes, torch.Tensor]:
    return piece[start:end] if isinstance(piece, bytes) else bytes_of(piece)[start:end]


def _host_address(piece) -> Optional[int]:
    """The address of a storage or tensor in host memory that ``write_in_place`` can write from; None on an
    accelerator (copied by DMA anyway) and for one it copies anyway (too small), which keeps torch's padding."""
    if piece.device.type != "cpu" or piece_length(piece) < MIN_IN_PLACE_BYTES:
        return None
    return piece.data_ptr()


