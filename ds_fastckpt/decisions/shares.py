"""Parallel writers: which ranks write a replicated file together, and which byte ranges each one writes.

Pure functions: every rank computes the same answer from the same gathered
facts, so no rank has to be told its share.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ds_fastckpt.native.op import DIRECT_ALIGNMENT, load_op

Range = Tuple[int, int]  # [start, end) in the file
Digest = Tuple[int, int]  # a storage's (byte size, CRC-32C of its bytes)


@dataclass(frozen=True)
class RankFacts:
    """What the group formation needs to know about one rank; gathered from every rank."""

    rank: int
    host: str
    local_rank: int
    data_parallel_ranks: Tuple[int, ...]  # the global ranks of its data-parallel group, in group rank order


def writer_groups(mode: str, node_local: bool, ranks: Sequence[RankFacts]) -> List[Tuple[int, ...]]:
    """The groups of ranks that write one copy of a replicated file together, writer DeepSpeed picks first.

    DeepSpeed picks one writer per data-parallel group: its data-parallel rank
    0 with shared storage, the rank with local rank 0 on each host with
    ``use_node_local_storage``. ``"all"`` adds every rank of the group;
    ``"node"`` adds the ranks of the group on the writer's host. Groups of
    one rank are left out: that rank writes alone, as with ``"off"``.

    Args:
        mode: ``parallel_writers``: "off", "all" or "node".
        node_local: DeepSpeed's ``checkpoint.use_node_local_storage`` (every host keeps its own copy).
        ranks: the facts of every rank.

    Returns:
        Sorted groups of global ranks, each one's writer first; the same list on every rank.
    """
    if mode == "off":
        return []
    by_rank: Dict[int, RankFacts] = {facts.rank: facts for facts in ranks}
    groups = set()
    for data_parallel in {facts.data_parallel_ranks for facts in ranks}:
        if node_local:
            writers = [rank for rank in data_parallel if by_rank[rank].local_rank == 0]
        else:
            writers = [data_parallel[0]]
        for writer in writers:
            host = by_rank[writer].host
            others = [rank for rank in data_parallel
                      if rank != writer and (mode == "all" or by_rank[rank].host == host)]
            if others:
                groups.add((writer, *sorted(others)))
    return sorted(groups)


def split_shares(file_size: int, shareable: Sequence[Range], writers: int) -> List[List[Range]]:
    """The byte ranges each writer writes of a file whose ``shareable`` ranges every writer holds.

    Writer 0 (the one DeepSpeed picks) writes every byte no other writer
    writes: the archive's headers and pickle, the storages only it holds,
    and the unaligned edges of the shared ones. Writers 1.. each get
    contiguous ranges inside the shareable ones, starting and ending on
    ``DIRECT_ALIGNMENT`` boundaries (O_DIRECT). The split aims at the same
    number of bytes per writer, writer 0's other bytes counted.

    Args:
        file_size: the file's size in bytes.
        shareable: ``[start, end)`` of each storage every writer holds, in file order, not overlapping.
        writers: how many ranks write the file.

    Returns:
        ``writers`` lists of ranges, in file order. Writer 0's list holds the ranges of the shareable
        bytes assigned to it; it also writes everything outside all the lists.
    """
    inner = [(_up(start), _down(end)) for start, end in shareable]
    inner = [(start, end) for start, end in inner if end > start]
    shared_bytes = sum(end - start for start, end in inner)
    fair = file_size / writers
    first = max(0.0, fair - (file_size - shared_bytes))  # what writer 0 takes of the shared bytes
    rest = (shared_bytes - first) / max(1, writers - 1)
    # Cumulative shared bytes at which each writer's part ends, cut at block boundaries.
    ends = [_down(round(first + index * rest)) for index in range(writers)]
    ends[-1] = shared_bytes
    shares: List[List[Range]] = [[] for _ in range(writers)]
    writer, done = 0, 0
    for start, end in inner:
        while start < end:
            while writer < writers - 1 and done >= ends[writer]:
                writer += 1
            take = min(end - start, ends[writer] - done)
            shares[writer].append((start, start + take))
            start += take
            done += take
    return [_merged(ranges) for ranges in shares]


def identical_storages(digests: Sequence[Optional[Sequence[Digest]]]) -> List[int]:
    """Which storages every writer holds with the same bytes: the only ones any writer but writer 0 may write.

    Args:
        digests: each writer's ``Digest`` of each of its candidate storages, in save order, writer 0's
            first; None for a writer that takes no part (its save already failed).

    Returns:
        The indices, into writer 0's list, of the storages whose digest every writer sent alike; none when a
        writer takes no part or holds another number of storages (its storages cannot be matched).
    """
    leader, others = digests[0], digests[1:]
    if leader is None or any(other is None or len(other) != len(leader) for other in others):
        return []
    return [index for index, digest in enumerate(leader)
            if all(tuple(other[index]) == tuple(digest) for other in others)]


class SharesDoNotTileError(ValueError):
    """The writers' segments of a shared file leave a gap or overlap: the file is not what any save wrote."""


def joined_crc32c(path: str, file_size: int, segments: Sequence[Tuple[int, int, int]]) -> int:
    """The CRC-32C of a whole file from the ``(offset, length, crc32c)`` runs its writers wrote; nothing is read.

    Raises:
        SharesDoNotTileError: naming ``path`` and the first gap or overlap, when the runs do not cover
            ``[0, file_size)`` exactly once.
    """
    combine = load_op().crc32c_combine
    crc, position = 0, 0
    for offset, length, run_crc in sorted(segments):
        if offset != position:
            what = "no writer wrote" if offset > position else "two writers wrote"
            raise SharesDoNotTileError(f"{path}: {what} bytes {min(offset, position)}-{max(offset, position)} of "
                                       f"{file_size}")
        crc = combine(crc, run_crc, length)
        position += length
    if position != file_size:
        raise SharesDoNotTileError(f"{path}: no writer wrote bytes {position}-{file_size} of {file_size}")
    return crc


def _merged(ranges: List[Range]) -> List[Range]:
    merged: List[Range] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _up(offset: int) -> int:
    return -(-offset // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT


def _down(offset: int) -> int:
    return offset // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
