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


def test_a_block_written_in_place_is_not_reused_before_the_writer_closes(tmp_path):
    """The snapshot is dropped while its file is open and a new one taken: it gets other memory, and the file holds
    the first snapshot's bytes (the disk may read a block written in place until close())."""
    from ds_fastckpt import AioFileWriter
    from ds_fastckpt.native.writer import torch_zip_crc32

    state = {"w": torch.arange(1 << 18, dtype=torch.float32)}
    expected = state["w"].clone()
    with torch_zip_crc32(False):
        layout = lay_out(state)
        snapshot = layout.snapshot()
        first_address = next(piece for piece in snapshot.pieces if not isinstance(piece, bytes)).data_ptr()
        path = tmp_path / "held.pt"
        writer = AioFileWriter(path)
        snapshot.write_to(writer)
        assert writer.bytes_in_place > 0
        del snapshot
        gc.collect()
        state["w"].fill_(-1.0)
        second = layout.snapshot()
        assert next(piece for piece in second.pieces if not isinstance(piece, bytes)).data_ptr() != first_address
        writer.close()
    assert torch.equal(torch.load(path, weights_only=True)["w"], expected)
    del second
