"""One replicated file written by its writer group at once (``parallel_writers``), and its record joined at commit.

Call order, on every rank of a ``WriterGroup``, inside ``save`` of the
model-states file DeepSpeed writes from each of them (``plan_share``):

1. the leader (the rank DeepSpeed picks alone) lays the file out and makes it
   at its full size: the spare's file when recycling, else a sparse new one;
2. one all-gather in the group: the leader sends the file's size and where
   the module parameters' storages lie in it; every other rank sends the
   sizes of its own parameter storages;
3. when they all match, every rank computes the same split
   (``shares.split_shares``) and writes its ranges into the same file through
   a shared ``AioFileWriter``: the leader every byte that is not another
   rank's (headers, pickle, buffers, ``client_state``, block edges), the
   others aligned ranges of parameter bytes from their own memory. When they
   do not match, the leader writes the whole file and the others nothing;
4. each rank's ``FileShare`` (its runs and their CRC-32C) goes to the commit,
   where ``join_shares`` makes one manifest record of them, with the file's
   CRC-32C combined from the runs: no byte is read back, and a gap or an
   overlap fails the commit.

Only parameters are shared: data-parallel ranks hold them identically
(ZeRO-1/2 gather them after every step), while buffers and ``client_state``
may differ between ranks and stay the leader's, as with one writer. The file
is byte for byte the one the leader alone would write.
"""

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple, Union

from ds_fastckpt.decisions.shares import joined_crc32c, split_shares
from ds_fastckpt.engine import collectives
from ds_fastckpt.engine.writer_groups import WriterGroup
from ds_fastckpt.format.manifest import FileRecord
from ds_fastckpt.native.file_part import FilePart
from ds_fastckpt.native.layout_save import lay_out, layout_first_supported, parameter_storages

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
               taking_part: bool = True) -> Union[FilePart, dict, None]:
    """This rank's part of the shared file ``state_dict`` is saved to; every member of ``group`` must call it.

    Args:
        state_dict: what DeepSpeed saves into the file on this rank.
        group: this rank's writer group.
        make_file: on the leader, makes the file at the size given (``Storage.make_sized_file``).
        failure: how a ``CommitError`` starts, naming the checkpoint and file.
        taking_part: False on a rank whose save already failed: it joins the exchange and writes nothing.

    Returns:
        A ``FilePart`` to write through a shared writer; on the leader, ``state_dict`` itself when this torch
        cannot lay files out first (then it writes the file alone, the usual way); None when this rank
        writes nothing.

    Raises:
        OSError: on the leader, from ``make_file``, once the others have heard of it.
        CommitError: when a member does not join within ``commit_timeout_s``.
    """
    storages = parameter_storages(state_dict) if taking_part else []
    layout, error, mine = None, None, [storage.nbytes() for storage in storages] if taking_part else None
    if group.is_leader:
        if taking_part and layout_first_supported():
            layout = lay_out(state_dict)
            try:
                make_file(layout.file_size)
            except OSError as caught:  # raised below, after every member has heard, so that none waits for us
                error = caught
        ranges = layout.storage_ranges(storages) if layout is not None and error is None else None
        mine = (layout.file_size if layout is not None else 0, ranges)
    gathered: Dict[int, object] = dict(group.ranks.gather((collectives.rank(), mine), failure))
    file_size, ranges = gathered[group.members[0]]
    if error is not None:
        raise error
    if ranges is None:
        return state_dict if group.is_leader and taking_part and layout is None else None
    sizes = [end - start for start, end in ranges]
    if any(gathered[member] != sizes for member in group.members[1:]):
        if group.is_leader:
            logger.warning("%s: the data-parallel ranks hold parameters of different sizes (or one failed), so "
                           "rank %d writes the whole file alone", failure, collectives.rank())
            return layout.part_without([])
        return None
    shares = split_shares(file_size, ranges, len(group.members))
    if group.is_leader:
        return layout.part_without(sorted(span for share in shares[1:] for span in share))
    if not shares[group.index]:
        return None
    return FilePart.of_storages(storages, [start for start, _ in ranges], shares[group.index], file_size)


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
