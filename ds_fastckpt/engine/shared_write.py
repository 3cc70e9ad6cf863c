"""One replicated file written by its writer group at once (``parallel_writers``), and its record joined at commit.

Call order, on every rank of a ``WriterGroup``, inside ``save`` of the
model-states file DeepSpeed writes from each of them (``plan_share``):

1. the leader (the rank DeepSpeed picks alone) lays the file out and makes it
   at its full size: the spare's file when recycling, else a sparse new one;
   every rank takes a digest (byte size and CRC-32C) of each storage of its
   module parameters (``layout_save.parameter_storages``);
2. one all-gather in the group: the leader sends the file's size, where the
   parameters' storages lie in it and their digests; every other rank sends
   the digests of its own. A rank that failed before the exchange (the
   leader's ``client_state`` cannot be pickled, the file cannot be made)
   sends nothing to share, and raises its error after the exchange, so that
   no rank waits for it;
3. every rank computes the same split (``shares.identical_storages``, then
   ``shares.split_shares``) and writes its ranges into the same file through
   a shared ``AioFileWriter``: the leader every byte that is not another
   rank's (headers, pickle, buffers, extra state, ``client_state``, block
   edges, every storage whose digest is not the same on every rank), the
   others aligned ranges of the identical storages from their own memory;
4. each rank's ``FileShare`` (its runs and their CRC-32C) goes to the commit,
   where ``join_shares`` makes one manifest record of them, with the file's
   CRC-32C combined from the runs: no byte is read back, and a gap or an
   overlap fails the commit.

Only parameter storages that every member holds with the same bytes (by their
digests) are shared. ZeRO-1/2 ranks hold most parameters identically, but not
all: ``OptimizedLinear`` with ``base_weight_sharding`` keeps a different shard
of its frozen weight on each rank, of the same size. Buffers, modules' extra
state (``get_extra_state()``) and ``client_state`` may differ between ranks
and are never shared, whatever their digests. The file is byte for byte the
one the leader alone would write.
"""

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch

from ds_fastckpt.decisions.shares import Digest, identical_storages, joined_crc32c, split_shares
from ds_fastckpt.engine import collectives
from ds_fastckpt.engine.writer_groups import WriterGroup
from ds_fastckpt.format.manifest import FileRecord
from ds_fastckpt.native.device_copy import DeviceCopier, bytes_of
from ds_fastckpt.native.file_part import FilePart
from ds_fastckpt.native.layout_save import lay_out, layout_first_supported, parameter_storages
from ds_fastckpt.native.op import load_op

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileShare:
    """What one rank wrote of a shared file: its runs as ``(offset, length, crc32c)``."""

    path: str  # relative to the tag directory, as in FileRecord
    file_size: int
    segments: Tuple[Tuple[int, int, int], ...]
    rank: int
    host: str


def plan_share(state_dict, group: WriterGroup, make_file: Callable[[int], None], failure: str,
               taking_part: bool = True, per_rank: Sequence[torch.Tensor] = ()) -> Union[FilePart, dict, None]:
    """This rank's part of the shared file ``state_dict`` is saved to; every member of ``group`` must call it.

    Args:
        state_dict: what DeepSpeed saves into the file on this rank.
        group: this rank's writer group.
        make_file: on the leader, makes the file at the size given (``Storage.make_sized_file``).
        failure: how a ``CommitError`` starts, naming the checkpoint and file.
        taking_part: False on a rank whose save already failed: it joins the exchange and writes nothing.
        per_rank: parameters DeepSpeed marks as each rank's own (``ds_optim_param``): never shared, nor digested.

    Returns:
        A ``FilePart`` to write through a shared writer; on the leader, ``state_dict`` itself when this torch
        cannot lay files out first (then it writes the file alone, the usual way); None when this rank
        writes nothing.

    Raises:
        Exception: this rank's own error (on the leader: laying the file out, such as a ``client_state`` that
            cannot be pickled, or ``make_file``'s ``OSError``), once the others have heard of it; they then write
            nothing and the commit fails on every rank.
        CommitError: when a member does not join within ``commit_timeout_s``.
    """
    layout, error, mine, storages = None, None, None, []
    try:
        if taking_part and layout_first_supported():
            storages = parameter_storages(state_dict, per_rank)
            if group.is_leader:
                layout = lay_out(state_dict)
                make_file(layout.file_size)
            digests = [_digest(storage) for storage in storages]
            mine = (layout.file_size, layout.storage_ranges(storages), digests) if group.is_leader else digests
    except Exception as caught:  # raised below, after every member has heard, so that none waits for us
        error, mine = caught, None
    gathered: Dict[int, object] = dict(group.ranks.gather((collectives.rank(), mine), failure))
    if error is not None:
        raise error
    if gathered[group.members[0]] is None:  # the leader writes the file alone, if at all
        return state_dict if group.is_leader and taking_part and layout is None else None
    file_size, ranges, leader_digests = gathered[group.members[0]]
    identical = identical_storages([leader_digests] + [gathered[member] for member in group.members[1:]])
    identical.sort(key=lambda index: ranges[index][0])  # file order, whatever order the module dict has
    if group.is_leader and len(identical) < len(ranges):
        _report_left_to_leader(failure, ranges, identical, [gathered[member] for member in group.members[1:]],
                               len(leader_digests))
    shares = split_shares(file_size, [ranges[index] for index in identical], len(group.members))
    if group.is_leader:
        return layout.part_without(sorted(span for share in shares[1:] for span in share))
    if not shares[group.index]:
        return None
    return FilePart.of_storages([storages[index] for index in identical], [ranges[index][0] for index in identical],
                                shares[group.index], file_size)


def _digest(storage: torch.UntypedStorage) -> Digest:
    """``storage``'s byte size and the CRC-32C of its bytes, read where they live (by DMA from an accelerator)."""
    data = bytes_of(storage)
    if data.device.type == "cpu":
        return storage.nbytes(), load_op().crc32c(data.numpy())
    if data.device not in _DIGEST_COPIERS:
        _DIGEST_COPIERS[data.device] = DeviceCopier(data.device)
    crc = _Crc32c()
    _DIGEST_COPIERS[data.device].write(data, crc)
    return storage.nbytes(), crc.value


# Pinned blocks for digesting accelerator storages, reused across saves (pinning is slow). Used on the training
# thread only: the engine's own copiers may be busy on the background writer at the same time.
_DIGEST_COPIERS: Dict[torch.device, DeviceCopier] = {}


class _Crc32c:
    """A writer that keeps only the CRC-32C of what is written to it (``DeviceCopier.write`` hands it blocks)."""

    def __init__(self):
        self.value = 0
        self._position = 0

    def tell(self) -> int:
        return self._position

    def write_in_place(self, data, *, until_written: bool = False) -> int:
        """Hashes ``data`` (a uint8 array) before returning: the block is free again either way."""
        self.value = load_op().crc32c(data, self.value)
        self._position += len(data)
        return len(data)


def _report_left_to_leader(failure: str, ranges: List[Tuple[int, int]], identical: List[int], others: list,
                           count: int) -> None:
    if any(other is None or len(other) != count for other in others):
        logger.warning("%s: the data-parallel ranks hold different parameters (or one failed), so rank %d writes "
                       "the whole file alone", failure, collectives.rank())
        return
    kept = set(identical)
    alone = [end - start for index, (start, end) in enumerate(ranges) if index not in kept]
    logger.info("%s: %d of %d parameter storages (%d bytes) differ between the data-parallel ranks (such as "
                "sharded frozen weights), so rank %d writes them alone", failure, len(alone), len(ranges),
                sum(alone), collectives.rank())


def join_shares(records: List[Union[FileRecord, FileShare]]) -> List[FileRecord]:
    """The manifest's records: every ``FileShare`` of a path joined into one ``FileRecord`` of the whole file.

    Raises:
        SharesDoNotTileError: when the shares of a file leave a gap or overlap.
    """
    joined = [record for record in records if isinstance(record, FileRecord)]
    by_path: Dict[str, List[FileShare]] = {}
    for record in records:
        if isinstance(record, FileShare):
            by_path.setdefault(record.path, []).append(record)
    for path, shares in sorted(by_path.items()):
        writer = min(shares, key=lambda share: share.rank)
        segments = [segment for share in shares for segment in share.segments]
        joined.append(FileRecord(path=path, bytes=writer.file_size,
                                 crc32c=joined_crc32c(path, writer.file_size, segments),
                                 rank=writer.rank, host=writer.host))
    return joined
