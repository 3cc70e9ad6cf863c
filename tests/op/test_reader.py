"""read_file returns exactly the file's bytes; MemoryFile feeds torch.load without a copy."""

import errno
import io
import os

import pytest
import torch

from ds_fastckpt.engine.verified_load import load_file
from ds_fastckpt.native.fault_injection import inject_fault
from ds_fastckpt.native.reader import MemoryFile, read_file

SIZES = [0, 1, 511, 4095, 4096, 4097, (1 << 20) + 3, 3 * (1 << 20)]


@pytest.mark.parametrize("size", SIZES)
def test_reads_exact_bytes(ext4_dir, size):
    payload = os.urandom(size)
    path = ext4_dir / "data.bin"
    path.write_bytes(payload)
    assert bytes(read_file(path, block_size=1 << 20, queue_depth=2)) == payload
    assert bytes(read_file(path, block_size=4096, queue_depth=3)) == payload


def test_torch_load_from_memory(ext4_dir):
    state = {"w": torch.randn(1000, 33), "step": 7, "nested": [torch.arange(5), "x"]}
    path = ext4_dir / "state.pt"
    torch.save(state, path)
    loaded = torch.load(MemoryFile(read_file(path)), weights_only=False)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    assert torch.equal(loaded["nested"][0], state["nested"][0]) and loaded["nested"][1] == "x"


def test_missing_file_keeps_errno_and_path(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        read_file(tmp_path / "nope.pt")
    assert raised.value.errno == errno.ENOENT and raised.value.filename == str(tmp_path / "nope.pt")


def test_read_error_keeps_errno_and_path(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 10000)
    with inject_fault("read", errno.EIO):
        with pytest.raises(OSError) as raised:
            read_file(path)
    assert raised.value.errno == errno.EIO and raised.value.filename == str(path)


def test_memory_file_seek_and_read():
    source = MemoryFile(b"0123456789")
    assert source.read(3) == b"012"
    assert source.seek(-2, io.SEEK_END) == 8 and source.read() == b"89"
    assert source.seek(4) == 4 and source.tell() == 4
    with pytest.raises(ValueError, match="negative seek position"):
        source.seek(-1)


def test_load_file_streams_and_returns_the_bytes(ext4_dir):
    state = {f"t{i}": torch.randn(300_000) for i in range(8)}
    path = ext4_dir / "big.pt"
    torch.save(state, path)
    loaded, data = load_file(path, block_size=64 << 10, queue_depth=4)  # weights_only: tensors only
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    assert bytes(data) == path.read_bytes()


def test_load_file_read_error_leaves_no_fd(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.randn(100_000)}, path)
    with inject_fault("read", errno.EIO, skip=1):
        with pytest.raises(OSError) as raised:
            load_file(path, block_size=4096, queue_depth=2)
    assert raised.value.errno == errno.EIO and raised.value.filename == str(path)
