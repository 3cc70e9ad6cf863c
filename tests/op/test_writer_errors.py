"""Failures reach the caller as OSError with errno and path, and leave nothing open."""

import errno
import logging
import os

import pytest
import torch

from ds_fastckpt import AioFileWriter, open_fds_under
from ds_fastckpt.native.fault_injection import inject_fault

SMALL = dict(io_buffer_size=8192, block_size=4096, queue_depth=2)


def test_enospc_on_small_tmpfs(mount_tmpfs):
    small = mount_tmpfs("small", "size=1m")
    path = small / "big.pt"
    writer = AioFileWriter(path, **SMALL)
    with pytest.raises(OSError) as raised:
        torch.save(torch.zeros(1 << 20), writer)  # 4 MiB into 1 MiB
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(path)
    assert open_fds_under(small) == []  # released at the failure, not at close()
    with pytest.raises(OSError) as at_close:
        writer.close()
    assert at_close.value is raised.value
    assert writer.closed
    writer.close()


def test_enospc_inside_with_block_reports_the_os_error(mount_tmpfs):
    small = mount_tmpfs("small", "size=1m")
    with pytest.raises(OSError) as raised:
        with AioFileWriter(small / "big.pt", **SMALL) as writer:
            torch.save({"w": torch.zeros(1 << 20)}, writer)
    assert raised.value.errno == errno.ENOSPC
    assert writer.closed
    assert open_fds_under(small) == []


def test_missing_directory(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "x.pt"
    with pytest.raises(FileNotFoundError) as raised:
        AioFileWriter(path)
    assert raised.value.errno == errno.ENOENT
    assert raised.value.filename == str(path)


def test_read_only_directory(tmp_path, mount_tmpfs):
    if os.geteuid() == 0:
        directory = mount_tmpfs("ro", "ro,size=1m")
        expected = errno.EROFS
    else:
        directory = tmp_path / "ro"
        directory.mkdir(mode=0o555)
        expected = errno.EACCES
    with pytest.raises(OSError) as raised:
        AioFileWriter(directory / "x.pt")
    assert raised.value.errno == expected
    assert raised.value.filename == str(directory / "x.pt")


@pytest.mark.parametrize("point", ["write", "ftruncate", "fsync", "close"])
def test_injected_io_error_closes_writer(tmp_path, point):
    path = tmp_path / f"{point}.bin"
    writer = AioFileWriter(path, **SMALL)
    with inject_fault(point, errno.EIO):
        writer.write(b"y" * 30000)
        with pytest.raises(OSError) as raised:
            writer.close()
    assert raised.value.errno == errno.EIO
    assert raised.value.filename == str(path)
    assert point in str(raised.value)
    assert writer.closed
    writer.close()  # a no-op: the failed fsync is never retried into a success
    assert open_fds_under(tmp_path) == []


def test_failed_fsync_is_not_retried(tmp_path):
    path = tmp_path / "fsync.bin"
    writer = AioFileWriter(path, **SMALL)
    writer.write(b"z" * 10)
    with inject_fault("fsync", errno.EIO):
        with pytest.raises(OSError, match="fsync"):
            writer.close()
        writer.close()
    with pytest.raises(ValueError, match="closed file"):
        writer.write(b"more")


def test_filesystem_without_o_direct_falls_back_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    obj = {"w": torch.randn(3000)}
    for name in ("a.pt", "b.pt"):
        with inject_fault("open_direct", errno.EINVAL):
            with AioFileWriter(tmp_path / name, **SMALL) as writer:
                torch.save(obj, writer)
        assert torch.equal(torch.load(tmp_path / name)["w"], obj["w"])
    warnings = [record.getMessage() for record in caplog.records if "O_DIRECT" in record.getMessage()]
    assert len(warnings) == 1
    assert str(tmp_path) in warnings[0]


def test_unknown_fault_point_is_named():
    with pytest.raises(ValueError, match="point='bogus' is not allowed"):
        with inject_fault("bogus"):
            pass
