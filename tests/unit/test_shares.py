"""Who writes a replicated file together, the byte ranges each writes, and the file's CRC joined from theirs."""

import random

import pytest

from ds_fastckpt.decisions.shares import (RankFacts, SharesDoNotTileError, identical_storages, joined_crc32c,
                                         split_shares, writer_groups)
from ds_fastckpt.native.op import DIRECT_ALIGNMENT as ALIGNMENT
from ds_fastckpt.native.op import load_op


def facts(world: int, per_host: int, data_parallel_groups):
    group_of = {rank: tuple(group) for group in data_parallel_groups for rank in group}
    return [RankFacts(rank, f"host{rank // per_host}", rank % per_host, group_of[rank]) for rank in range(world)]


@pytest.mark.parametrize("mode, node_local, expected", [
    ("off", False, []),
    ("all", False, [(0, 1, 2, 3)]),
    ("node", False, [(0, 1)]),  # the ranks on rank 0's host; the other host's ranks do not write this copy
    ("node", True, [(0, 1), (2, 3)]),  # each host's copy, by that host's ranks
])
def test_groups_of_one_data_parallel_group_on_two_hosts(mode, node_local, expected):
    assert writer_groups(mode, node_local, facts(4, 2, [range(4)])) == expected


def test_groups_with_tensor_parallel_pairs():
    """8 ranks, 4 per host, tensor parallel 2: data-parallel groups are the even and the odd ranks."""
    ranks = facts(8, 4, [(0, 2, 4, 6), (1, 3, 5, 7)])
    assert writer_groups("all", False, ranks) == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert writer_groups("node", False, ranks) == [(0, 2), (1, 3)]
    # With node-local storage DeepSpeed picks local rank 0 of each host, which only the even group has.
    assert writer_groups("node", True, ranks) == [(0, 2), (4, 6)]


def test_a_group_of_one_is_left_out():
    assert writer_groups("node", False, facts(2, 1, [range(2)])) == []


def random_layout(rng: random.Random):
    position, shareable = rng.randint(0, 10000), []
    for _ in range(rng.randint(0, 8)):
        position += rng.randint(30, 9000)
        length = rng.choice([0, 1, 100, 4096, 5000, 1 << 20, rng.randint(0, 3 << 20)])
        shareable.append((position, position + length))
        position += length
    return position + rng.randint(0, 9000), shareable


def test_shares_are_aligned_disjoint_inside_the_storages_and_cover_their_aligned_bytes():
    rng = random.Random(7)
    for _ in range(3000):
        file_size, shareable = random_layout(rng)
        writers = rng.randint(1, 5)
        shares = split_shares(file_size, shareable, writers)
        assert len(shares) == writers
        ranges = sorted(span for share in shares for span in share)
        assert all(start % ALIGNMENT == 0 and end % ALIGNMENT == 0 and end > start for start, end in ranges)
        assert all(first[1] <= second[0] for first, second in zip(ranges, ranges[1:]))
        assert all(any(low <= start and end <= high for low, high in shareable) for start, end in ranges)
        aligned = sum(max(0, high // ALIGNMENT * ALIGNMENT - -(-low // ALIGNMENT) * ALIGNMENT)
                      for low, high in shareable)
        assert sum(end - start for start, end in ranges) == aligned


def test_the_split_evens_out_the_bytes_each_writer_writes():
    """Writer 0 also writes everything outside the shares; its part of the shared bytes is smaller by that."""
    mib = 1 << 20
    shareable = [(64, 100 * mib + 64), (100 * mib + 4160, 300 * mib)]  # 300 MiB of parameters after a header
    file_size = 310 * mib  # 10 MiB only writer 0 holds (buffers, client_state)
    shares = split_shares(file_size, shareable, 3)
    outside = file_size - sum(end - start for share in shares for start, end in share)
    written = [sum(end - start for start, end in share) for share in shares]
    written[0] += outside
    assert min(written) / max(written) > 0.999, written


def test_the_others_take_every_shared_byte_when_writer_zero_has_its_fair_part_already():
    assert split_shares(100 << 20, [(0, 8192)], 2) == [[], [(0, 8192)]]


@pytest.mark.parametrize("digests, expected", [
    ([[(8, 1), (8, 2), (4, 3)], [(8, 1), (8, 2), (4, 3)], [(8, 1), (8, 2), (4, 3)]], [0, 1, 2]),
    ([[(8, 1), (8, 2), (4, 3)], [(8, 1), (8, 9), (4, 3)], [(8, 1), (8, 2), (4, 3)]], [0, 2]),  # other bytes
    ([[(8, 1), (8, 2)], [(8, 1), (16, 2)]], [0]),  # the same CRC, another size
    ([[(8, 1), (8, 2)], [(8, 1)]], []),  # another number of storages: none can be matched
    ([[(8, 1)], None], []),  # a writer whose save failed
    ([None, [(8, 1)]], []),
    ([[(8, 1)], [[8, 1]]], [0]),  # lists, as a gather may hand tuples back
])
def test_only_storages_identical_on_every_writer_are_shared(digests, expected):
    assert identical_storages(digests) == expected


def test_joined_crc_equals_the_crc_of_the_whole_file():
    op = load_op()
    data = random.Random(3).randbytes(3 * 4096 + 77)
    cuts = [0, 4096, 12288, len(data)]
    runs = [(start, end - start, op.crc32c(data[start:end])) for start, end in zip(cuts, cuts[1:])]
    assert joined_crc32c("f.pt", len(data), list(reversed(runs))) == op.crc32c(data)


@pytest.mark.parametrize("runs, message", [
    ([(0, 4096), (8192, 100)], "f.pt: no writer wrote bytes 4096-8192 of 8292"),
    ([(0, 8192), (4096, 4196)], "f.pt: two writers wrote bytes 4096-8192 of 8292"),
    ([(0, 4096)], "f.pt: no writer wrote bytes 4096-8292 of 8292"),
])
def test_a_gap_or_an_overlap_is_refused_with_the_bytes_named(runs, message):
    with pytest.raises(SharesDoNotTileError) as raised:
        joined_crc32c("f.pt", 8292, [(offset, length, 0) for offset, length in runs])
    assert str(raised.value) == message
