"""HostBlocks: a snapshot's CPU memory serves the next snapshot of the same sizes, and the cache never keeps more
than snapshots held at once."""

import gc

import torch

from ds_fastckpt.native.host_blocks import HostBlocks
from ds_fastckpt.native.layout_save import lay_out


def test_a_block_comes_back_when_its_view_is_freed_and_serves_the_same_size_again():
    blocks = HostBlocks()
    block = blocks.take(10_000)
    address = block.data_ptr()
    view = blocks.lend(block, 100, 5000)
    del block
    gc.collect()
    assert blocks.kept_bytes == 0  # still lent
    del view
    gc.collect()
    assert blocks.kept_bytes == 10_000
    again = blocks.take(10_000)
    assert again.data_ptr() == address and blocks.kept_bytes == 0
    assert blocks.take(20_000).data_ptr() != address  # another size is a new block


def test_the_cache_keeps_no_more_than_was_ever_lent_at_once():
    blocks = HostBlocks()
    first = blocks.lend(blocks.take(4000), 0, 4000)
    del first
    gc.collect()
    second = blocks.lend(blocks.take(6000), 0, 6000)  # another size: the peak in use is 6000
    del second
    gc.collect()
    assert blocks.kept_bytes <= 6000
    blocks.clear()
    assert blocks.kept_bytes == 0


def test_consecutive_snapshots_of_a_state_reuse_the_same_memory():
    state = {"w": torch.randn(1 << 18), "b": torch.randn(1000)}
    layout = lay_out(state)
    first = layout.snapshot()
    addresses = [piece.data_ptr() for piece in first.pieces if not isinstance(piece, bytes)]
    del first
    gc.collect()
    state["w"].add_(1)
    second = layout.snapshot()
    assert [piece.data_ptr() for piece in second.pieces if not isinstance(piece, bytes)] == addresses
    copy_of_w = next(piece for piece in second.pieces if not isinstance(piece, bytes))
    assert torch.equal(copy_of_w.view(torch.float32), state["w"])  # the kept block holds the new values
