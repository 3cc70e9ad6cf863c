"""AioFileWriter writes exactly what torch.save writes, on disk, with no descriptor left behind."""

import io
import os
import random
import re
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_fastckpt import AioFileWriter, StagingBuffer, deleted_fds_under, open_fds_under
from ds_fastckpt.native.op import load_op

# Small staging halves and blocks so that kilobyte payloads cross many halves.
HALF = 8192
SMALL = dict(io_buffer_size=HALF, block_size=4096, queue_depth=2)

PAYLOAD_SIZES = [0, 1, 511, 512, 4095, 4096, 4097, (1 << 20) + 3, HALF - 1, HALF, HALF + 1, 2 * HALF - 1,
                 2 * HALF, 2 * HALF + 1, 3 * HALF + 1]


def bytes_io_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def aio_save(obj, path, **kwargs) -> None:
    with AioFileWriter(path, **kwargs) as writer:
        torch.save(obj, writer)


def nested_state_dict():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 33, generator=generator)
    return {
        "module": {f"layer{i}.weight": torch.randn(17 * i + 1, 7, generator=generator) for i in range(20)},
        "bf16": torch.randn(129, generator=generator).to(torch.bfloat16),
        "ints": torch.arange(1001, dtype=torch.int64),
        "mask": torch.rand(513, generator=generator) > 0.5,
        "view": base[:, 3:9],
        "shared": [base, base.t()],
        "step": 12345,
        "lr": 1e-4,
        "name": "global_step12345",
        "nested": {"list": [1, (2, 3), {"x": None}], "bytes": b"\x00\xff"},
    }


@pytest.mark.parametrize("size", PAYLOAD_SIZES)
def test_raw_bytes_are_exact(ext4_dir, size):
    payload = os.urandom(size)
    path = ext4_dir / "raw.bin"
    with AioFileWriter(path, **SMALL) as writer:
        assert writer.write(payload) == size
        assert writer.tell() == size
    assert path.read_bytes() == payload


@pytest.mark.parametrize("size", [0, 1, 4097, 3 * HALF + 1])
def test_checksum_is_crc32c_of_the_file(tmp_path, size):
    payload = os.urandom(size)
    path = tmp_path / "sum.bin"
    writer = AioFileWriter(path, **SMALL)
    writer.write(payload)
    with pytest.raises(ValueError, match="only after a successful close"):
        writer.checksum
    writer.close()
    assert writer.checksum == load_op().crc32c(path.read_bytes())


def test_crc32c_matches_the_standard_check_value():
    assert load_op().crc32c(b"123456789") == 0xE3069283
    assert load_op().crc32c(b"56789", load_op().crc32c(b"1234")) == 0xE3069283


@pytest.mark.parametrize("size", PAYLOAD_SIZES)
@pytest.mark.parametrize("buffers", ["small", "default"])
def test_torch_save_is_byte_identical(ext4_dir, size, buffers):
    obj = torch.frombuffer(bytearray(os.urandom(size)), dtype=torch.uint8) if size else torch.empty(0)
    path = ext4_dir / "tensor.pt"
    aio_save(obj, path, **(SMALL if buffers == "small" else {}))
    assert path.read_bytes() == bytes_io_save(obj)
    assert torch.equal(torch.load(path), obj)


@pytest.mark.parametrize("buffers", ["small", "default"])
def test_nested_state_dict_round_trips(ext4_dir, buffers):
    obj = nested_state_dict()
    path = ext4_dir / "state.pt"
    aio_save(obj, path, **(SMALL if buffers == "small" else {}))
    assert path.read_bytes() == bytes_io_save(obj)
    loaded = torch.load(path)
    for name, tensor in obj["module"].items():
        assert torch.equal(loaded["module"][name], tensor)
    assert torch.equal(loaded["bf16"], obj["bf16"]) and loaded["bf16"].dtype == torch.bfloat16
    assert torch.equal(loaded["view"], obj["view"])
    assert loaded["shared"][0].untyped_storage().data_ptr() == loaded["shared"][1].untyped_storage().data_ptr()
    assert {k: loaded[k] for k in ("step", "lr", "name", "nested")} == {
        k: obj[k]
        for k in ("step", "lr", "name", "nested")
    }


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 5 * HALF), seed=st.integers(0, 2**32 - 1))
def test_any_chunking_writes_exact_bytes(tmp_path_factory, size, seed):
    directory = tmp_path_factory.mktemp("chunks")
    rng = random.Random(seed)
    payload = rng.randbytes(size)
    path = directory / "chunked.bin"
    with AioFileWriter(path, **SMALL) as writer:
        offset = 0
        while offset < size:
            step = rng.choice([1, 7, 511, 4096, HALF - 3, HALF + 5, 3 * HALF])
            writer.write(memoryview(payload)[offset:offset + step])
            offset += step
    assert path.read_bytes() == payload
    assert open_fds_under(directory) == []


def test_resaving_smaller_over_larger_leaves_exact_size(ext4_dir):
    path = ext4_dir / "resave.pt"
    aio_save(torch.zeros(1 << 20), path, **SMALL)
    small = {"x": torch.arange(10)}
    aio_save(small, path, **SMALL)
    expected = bytes_io_save(small)
    assert os.path.getsize(path) == len(expected)
    assert path.read_bytes() == expected
    assert torch.equal(torch.load(path)["x"], small["x"])


def test_writes_after_close_raise_value_error(tmp_path):
    writer = AioFileWriter(tmp_path / "closed.bin", **SMALL)
    writer.close()
    writer.close()
    assert writer.closed
    with pytest.raises(ValueError, match="closed file"):
        writer.write(b"x")


def test_non_contiguous_buffer_is_refused(tmp_path):
    strided = memoryview(bytearray(range(100)))[::2]
    with AioFileWriter(tmp_path / "strided.bin", **SMALL) as writer:
        with pytest.raises(ValueError, match="C-contiguous"):
            writer.write(strided)
        writer.write(strided.tobytes())
    assert (tmp_path / "strided.bin").read_bytes() == bytes(range(0, 100, 2))


def test_file_object_protocol(tmp_path):
    with AioFileWriter(tmp_path / "proto.bin", **SMALL) as writer:
        assert writer.writable() and not writer.readable() and not writer.seekable()
        writer.flush()
        assert writer.name == str(tmp_path / "proto.bin")
    assert writer.closed


def test_shared_staging_buffer_serves_one_writer_at_a_time(tmp_path):
    staging = StagingBuffer(HALF)
    first = AioFileWriter(tmp_path / "a.bin", staging=staging, block_size=4096)
    with pytest.raises(RuntimeError, match="already used"):
        AioFileWriter(tmp_path / "b.bin", staging=staging, block_size=4096)
    first.write(b"a" * (3 * HALF + 1))
    first.close()
    with AioFileWriter(tmp_path / "b.bin", staging=staging, block_size=4096) as second:
        second.write(b"b" * 10)
    assert (tmp_path / "a.bin").read_bytes() == b"a" * (3 * HALF + 1)
    assert (tmp_path / "b.bin").read_bytes() == b"b" * 10


def test_staging_is_host_memory_without_accelerator():
    staging = StagingBuffer(HALF)
    assert staging.tensor.device.type == "cpu"
    assert staging.tensor.numel() >= 2 * HALF + 4096
    assert staging.pinned == torch.cuda.is_available()


@pytest.mark.parametrize("kwargs, message", [
    (dict(io_buffer_size=4095), "io_buffer_size=4095 is not allowed: it must be a positive multiple of 4096"),
    (dict(io_buffer_size=0), "io_buffer_size=0 is not allowed"),
    (dict(block_size=1000), "block_size=1000 is not allowed: it must be a positive multiple of 4096"),
    (dict(block_size=True), "block_size=True is not allowed"),
    (dict(queue_depth=0), "queue_depth=0 is not allowed: it must be a positive integer"),
    (dict(queue_depth=2.5), "queue_depth=2.5 is not allowed"),
    (dict(queue_depth=65537), "queue_depth=65537 is not allowed: it must be a positive integer, at most 65536"),
    (dict(queue_depth=2**31), "queue_depth=2147483648 is not allowed"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AioFileWriter(tmp_path / "bad.bin", **kwargs)
    assert not (tmp_path / "bad.bin").exists()


def test_staging_allocation_failure_names_io_buffer_size():
    # 2 x 16 TiB: more than any host here has, so the allocator refuses it (with overcommit heuristics on)
    with open("/proc/sys/vm/overcommit_memory") as file:
        if file.read().strip() == "1":
            pytest.skip("vm.overcommit_memory=1 lets any allocation succeed")
    with pytest.raises(MemoryError, match=f"cannot allocate the staging buffer for io_buffer_size={1 << 44}: "
                                          f"{(2 << 44) + 4096} bytes of host memory are needed .*; lower "
                                          f"io_buffer_size$"):
        StagingBuffer(1 << 44)


def test_staging_size_mismatch_is_named(tmp_path):
    with pytest.raises(ValueError, match="io_buffer_size=16384 is not allowed with a staging buffer of 8192"):
        AioFileWriter(tmp_path / "bad.bin", staging=StagingBuffer(HALF), io_buffer_size=2 * HALF)


def test_cuda_staging_is_pinned(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    staging = StagingBuffer(HALF)
    assert staging.pinned
    tensor = torch.randn(1000, device="cuda")
    path = tmp_path / "cuda.pt"
    aio_save({"t": tensor}, path, staging=staging)
    assert torch.equal(torch.load(path)["t"], tensor.cpu())
    assert deleted_fds_under(tmp_path) == []


def physical_extents(path) -> list:
    """(logical block, physical block, length) of each extent of ``path``, from FIEMAP (``filefrag -v``)."""
    found = subprocess.run(["filefrag", "-v", "-b4096", str(path)], check=True, capture_output=True, text=True)
    rows = re.findall(r"^\s*\d+:\s*(\d+)\.\.\s*\d+:\s*(\d+)\.\.\s*\d+:\s*(\d+):", found.stdout, re.MULTILINE)
    return [tuple(map(int, row)) for row in rows]


@pytest.mark.parametrize("old_size, new_size", [(1 << 20, 1 << 20), (1 << 20, 300_001), (300_001, (1 << 20) + 7)])
def test_overwrite_writes_over_the_files_blocks_in_place(ext4_dir, old_size, new_size):
    path = ext4_dir / "recycled.bin"
    with AioFileWriter(path, **SMALL) as writer:
        writer.write(random.Random(1).randbytes(old_size))
    inode, old_extents = os.stat(path).st_ino, physical_extents(path)
    payload = random.Random(2).randbytes(new_size)
    with AioFileWriter(path, overwrite=True, **SMALL) as writer:
        writer.write(payload)
    assert path.read_bytes() == payload  # exact length: the old tail is cut, a longer file grows
    assert os.stat(path).st_ino == inode
    kept_blocks = min(old_size, new_size) // 4096
    new_extents = physical_extents(path)
    assert old_extents and new_extents[0][:2] == old_extents[0][:2]  # the first block is where it was
    assert sum(length for _, _, length in new_extents) >= kept_blocks
    assert writer.checksum == load_op().crc32c(payload)
    assert open_fds_under(ext4_dir) == []


def test_without_overwrite_an_existing_file_gets_new_blocks(ext4_dir):
    """The control of the test above: O_TRUNC frees the blocks, and ext4 does not hand them out again at once."""
    path = ext4_dir / "fresh.bin"
    with AioFileWriter(path, **SMALL) as writer:
        writer.write(b"a" * (1 << 20))
    old_extents = physical_extents(path)
    with AioFileWriter(path, **SMALL) as writer:
        writer.write(b"b" * (1 << 20))
    assert path.read_bytes() == b"b" * (1 << 20)
    assert physical_extents(path)[0][1] != old_extents[0][1]


def aligned_payload(size: int, seed: int):
    """A buffer for ``write_aligned`` and the ``size`` bytes the op writes from it: its first 4096-aligned window."""
    buffer = torch.randint(0, 256, (size + 4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    start = -buffer.data_ptr() % 4096
    return buffer, buffer[start:start + size].numpy().tobytes()


@pytest.mark.parametrize("old_size, new_size", [(64 << 10, 64 << 10), (64 << 10, 16 << 10), (16 << 10, 64 << 10)])
def test_write_aligned_overwrite_writes_over_the_files_blocks_in_place(ext4_dir, old_size, new_size):
    """The raw ceiling of a recycling save (benchmarks/bench_save.py): fio's write over a laid-out file."""
    path = ext4_dir / "ceiling.bin"
    op = load_op()
    buffer, _ = aligned_payload(old_size, seed=1)
    op.write_aligned(str(path), buffer, old_size, 4096, 2, True)
    inode, old_extents = os.stat(path).st_ino, physical_extents(path)
    buffer, payload = aligned_payload(new_size, seed=2)
    op.write_aligned(str(path), buffer, new_size, 4096, 2, True, "overwrite")
    assert path.read_bytes() == payload
    assert os.stat(path).st_ino == inode
    assert physical_extents(path)[0][:2] == old_extents[0][:2]
    with pytest.raises(ValueError, match="existing=shared is not allowed for write_aligned: use 'truncate' or "
                                         "'overwrite'"):
        op.write_aligned(str(path), buffer, new_size, 4096, 2, True, "shared")
    assert path.read_bytes() == payload
    assert open_fds_under(ext4_dir) == []


def make_sized(path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.ftruncate(fd, size)
    os.close(fd)


@pytest.mark.parametrize("size", [3 * HALF + 1, 5 * HALF, 4096 * 7 + 5])
def test_shared_writers_fill_one_file_and_their_runs_join_to_its_crc(ext4_dir, size):
    """Three writers, each at the ranges it owns and skipping the others': the file is the payload exactly."""
    payload = os.urandom(size)
    path = ext4_dir / "shared.bin"
    make_sized(path, size)
    cuts = [0, 4096, 3 * 4096, size]  # the last writer writes the unaligned tail
    runs = []
    for start, end in zip(cuts, cuts[1:]):
        with AioFileWriter(path, shared=True, **SMALL) as writer:
            if start:
                assert writer.skip(start) == start
            writer.write(payload[start:end])
        assert [(offset, length) for offset, length, _ in writer.segments] == [(start, end - start)]
        runs += writer.segments
    assert path.read_bytes() == payload  # also the size: the tail's block padding was cut
    crc = 0
    for _, length, run_crc in sorted(runs):
        crc = load_op().crc32c_combine(crc, run_crc, length)
    assert crc == load_op().crc32c(payload)


def test_one_writer_skipping_a_middle_range_reports_two_runs(ext4_dir):
    payload = os.urandom(6 * 4096 + 9)
    path = ext4_dir / "holes.bin"
    make_sized(path, len(payload))
    with AioFileWriter(path, shared=True, **SMALL) as writer:
        writer.write(payload[:8192])
        writer.skip(4096 * 3)
        writer.write(payload[4096 * 5:])
    op = load_op()
    assert writer.segments == [(0, 8192, op.crc32c(payload[:8192])),
                               (4096 * 5, len(payload) - 4096 * 5, op.crc32c(payload[4096 * 5:]))]
    data = path.read_bytes()
    assert len(data) == len(payload) and data[:8192] == payload[:8192] and data[4096 * 5:] == payload[4096 * 5:]
    assert data[8192:4096 * 5] == bytes(4096 * 3)  # what nobody wrote is still a hole


@pytest.mark.parametrize("written, skipped", [(100, 4096), (4096, 100), (0, 4095)])
def test_skip_from_or_over_a_partial_block_is_refused(ext4_dir, written, skipped):
    path = ext4_dir / "misaligned.bin"
    make_sized(path, 1 << 16)
    with AioFileWriter(path, shared=True, **SMALL) as writer:
        writer.write(bytes(written))
        with pytest.raises(ValueError, match=f"skip\\({skipped}\\) at position {written} of .*misaligned.bin: the "
                           "position and the size must be non-negative multiples of 4096"):
            writer.skip(skipped)


def test_shared_writer_needs_the_file_and_never_grows_it(ext4_dir):
    with pytest.raises(FileNotFoundError) as raised:
        AioFileWriter(ext4_dir / "missing.bin", shared=True, **SMALL)
    assert raised.value.filename == str(ext4_dir / "missing.bin")
    path = ext4_dir / "small.bin"
    make_sized(path, 4096)
    writer = AioFileWriter(path, shared=True, **SMALL)
    writer.write(bytes(4097))
    with pytest.raises(OSError) as raised:
        writer.close()
    assert raised.value.errno == 27 and "wrote up to byte 4097 of a shared file of 4096 bytes" in str(raised.value)
    assert path.stat().st_size == 4096


def test_shared_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="overwrite=True and shared=True are not allowed together"):
        AioFileWriter(tmp_path / "f.bin", shared=True, overwrite=True)


def test_the_op_refuses_an_unknown_existing_mode_and_a_misaligned_skip(tmp_path):
    """The binding's own checks, under AioFileWriter's: a bad mode is named; a bad skip closes the writer."""
    op, staging = load_op(), StagingBuffer(HALF)
    with pytest.raises(ValueError, match="existing=append is not allowed: use 'truncate', 'overwrite' or 'shared'"):
        op.AioWriter(str(tmp_path / "f.bin"), staging.tensor, HALF, 4096, 2, True, "append")
    assert not (tmp_path / "f.bin").exists()
    writer = op.AioWriter(str(tmp_path / "g.bin"), staging.tensor, HALF, 4096, 2, True)
    writer.write(b"x" * 100)
    with pytest.raises(OSError) as raised:
        writer.skip(4096)
    assert raised.value.errno == 22 and raised.value.filename == str(tmp_path / "g.bin")
    assert "skip (position 100 and length 4096 must be multiples of 4096)" in str(raised.value)
    assert not writer.is_open
