"""AioFileWriter.write_in_place: bytes go to disk from their own memory where O_DIRECT allows, else through staging,
and the file, its checksum and its descriptors are what write() gives."""

import errno

import pytest
import torch

from ds_fastckpt import AioFileWriter, open_fds_under
from ds_fastckpt.native.fault_injection import inject_fault
from ds_fastckpt.native.op import DIRECT_ALIGNMENT, load_op
from ds_fastckpt.native.op_builder import FastCkptBuilder

pytestmark = pytest.mark.skipif(not FastCkptBuilder().is_compatible(),
                                reason="the native op needs libaio (apt-get install libaio-dev)")

SMALL = dict(io_buffer_size=64 << 10, block_size=16 << 10, queue_depth=4)


def random_bytes(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def prefix_for(source: torch.Tensor, alignment: int, congruent: bool) -> bytes:
    """Bytes to write first so that the source starts at a position that agrees (or not) with its address."""
    residue = source.data_ptr() % alignment
    return b"p" * (residue if congruent else residue + 1)


def test_the_kernel_s_alignment_is_asked_for_not_assumed(ext4_dir):
    with AioFileWriter(ext4_dir / "a.bin") as writer:
        alignment = writer.memory_alignment
    # A power of two that divides O_DIRECT's block: what statx(STATX_DIOALIGN) reports, or the 4096 fallback.
    assert alignment & (alignment - 1) == 0 and DIRECT_ALIGNMENT % alignment == 0
    assert alignment == 1 or writer.is_direct


@pytest.mark.parametrize("size", [(64 << 10) + 4096, (1 << 20) + 4097, 3 * (1 << 20)])
@pytest.mark.parametrize("tail", [b"", b"t" * 5000])
def test_a_congruent_source_goes_to_disk_uncopied_and_the_file_is_exact(ext4_dir, size, tail):
    source = random_bytes(size)
    path = ext4_dir / "in_place.bin"
    with AioFileWriter(path, **SMALL) as writer:
        prefix = prefix_for(source, writer.memory_alignment, congruent=True)
        writer.write(prefix)
        assert writer.write_in_place(source.numpy()) == size
        writer.write(tail)
        assert writer.tell() == len(prefix) + size + len(tail)
    expected = prefix + source.numpy().tobytes() + tail
    assert path.read_bytes() == expected
    assert writer.checksum == load_op().crc32c(expected)
    head = -len(prefix) % DIRECT_ALIGNMENT
    assert writer.bytes_in_place == (size - head) // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
    assert open_fds_under(ext4_dir) == []


def test_a_source_that_disagrees_with_the_position_is_copied(ext4_dir):
    source = random_bytes(1 << 20, seed=1)
    path = ext4_dir / "copied.bin"
    with AioFileWriter(path, **SMALL) as writer:
        if writer.memory_alignment == 1:
            pytest.fail("ext4_dir must be written with O_DIRECT for this test")
        prefix = prefix_for(source, writer.memory_alignment, congruent=False)
        writer.write(prefix)
        writer.write_in_place(source.numpy())
    assert writer.bytes_in_place == 0
    assert path.read_bytes() == prefix + source.numpy().tobytes()
    assert writer.checksum == load_op().crc32c(path.read_bytes())


def test_small_sources_are_copied(ext4_dir):
    source = random_bytes((64 << 10) - 1, seed=2)  # under the 64 KiB a body needs, wherever its edge falls
    with AioFileWriter(ext4_dir / "small.bin", **SMALL) as writer:
        writer.write(prefix_for(source, writer.memory_alignment, congruent=True))
        writer.write_in_place(source.numpy())
    assert writer.bytes_in_place == 0


def test_until_written_frees_the_source_on_return(ext4_dir):
    source = random_bytes(1 << 20, seed=3)
    kept = source.clone()
    path = ext4_dir / "until_written.bin"
    with AioFileWriter(path, **SMALL) as writer:
        prefix = prefix_for(source, writer.memory_alignment, congruent=True)
        writer.write(prefix)
        writer.write_in_place(source.numpy(), until_written=True)
        source.fill_(0xAB)  # the caller reuses its block at once
        writer.write_in_place(source.numpy()[:4096])
    assert writer.bytes_in_place > 0
    assert path.read_bytes() == prefix + kept.numpy().tobytes() + bytes([0xAB]) * 4096


def test_shared_writers_write_their_ranges_from_memory(ext4_dir):
    """Two writers of one file, each writing its range in place and skipping the other's."""
    block = torch.empty((2 << 20) + DIRECT_ALIGNMENT, dtype=torch.uint8)
    start = -block.data_ptr() % DIRECT_ALIGNMENT
    source = block[start:start + (2 << 20)].copy_(random_bytes(2 << 20, seed=4))  # page-aligned, like a snapshot
    path = ext4_dir / "shared.bin"
    with open(path, "wb") as file:
        file.truncate(source.numel())
    half = source.numel() // 2
    crcs = []
    for start, end in [(0, half), (half, source.numel())]:
        with AioFileWriter(path, shared=True, **SMALL) as writer:
            if start:
                writer.skip(start)
            writer.write_in_place(source[start:end].numpy())
        crcs.append(writer.segments[0][2])
        assert writer.bytes_in_place >= end - start - 2 * DIRECT_ALIGNMENT
    assert path.read_bytes() == source.numpy().tobytes()
    assert load_op().crc32c_combine(crcs[0], crcs[1], half) == load_op().crc32c(source.numpy())


def test_a_buffered_file_writes_any_address_in_place(tmp_path):
    """Where the filesystem refuses O_DIRECT, memory needs no alignment: a large source at any address goes
    uncopied."""
    source = random_bytes((1 << 20) + 3, seed=5)
    path = tmp_path / "buffered.bin"
    with inject_fault("open_direct", errno.EINVAL):  # how a filesystem refusing O_DIRECT looks to the op
        writer = AioFileWriter(path, **SMALL)
    with writer:
        assert not writer.is_direct and writer.memory_alignment == 1
        writer.write(b"x" * 3)
        writer.write_in_place(source.numpy()[1:])
    assert path.read_bytes() == b"xxx" + source.numpy().tobytes()[1:]
    assert writer.bytes_in_place == (source.numel() - 1 - (DIRECT_ALIGNMENT - 3)) // DIRECT_ALIGNMENT * 4096


@pytest.mark.parametrize("point, code", [("write", errno.EIO), ("write", errno.ENOSPC)])
def test_a_failed_write_from_memory_keeps_errno_and_path_and_closes_the_descriptor(ext4_dir, point, code):
    source = random_bytes(1 << 20, seed=6)
    path = ext4_dir / "failed.bin"
    writer = AioFileWriter(path, **SMALL)
    with inject_fault(point, code, skip=2):
        writer.write(prefix_for(source, writer.memory_alignment, congruent=True))
        writer.write_in_place(source.numpy())
        with pytest.raises(OSError) as raised:
            writer.close()
    assert raised.value.errno == code and raised.value.filename == str(path)
    assert writer.closed
    assert open_fds_under(ext4_dir) == []


def test_a_non_contiguous_source_is_refused(tmp_path):
    with AioFileWriter(tmp_path / "x.bin") as writer:
        with pytest.raises(ValueError, match="write_in_place\\(\\) needs a C-contiguous"):
            writer.write_in_place(torch.arange(100, dtype=torch.uint8).numpy()[::2])
