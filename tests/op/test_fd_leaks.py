"""The seed bug (DeepSpeed PR 8005), observed where it lives: in /proc/self/fd."""

import gc
import os

import pytest
import torch

from ds_fastckpt import AioFileWriter, deleted_fds_under, op_fd_counters, open_fds_under

SMALL = dict(io_buffer_size=8192, block_size=4096, queue_depth=2)


class ExplodingPickle:

    def __reduce__(self):
        raise RuntimeError("refusing to be pickled")


@pytest.mark.parametrize("iterations", [1, 5, 20])
def test_save_close_unlink_leaves_no_fd(ext4_dir, iterations):
    before = op_fd_counters()
    for step in range(iterations):
        path = ext4_dir / f"ckpt_{step}.pt"
        with AioFileWriter(path, **SMALL) as writer:
            torch.save({"w": torch.randn(5000), "step": step}, writer)
        os.unlink(path)
    assert open_fds_under(ext4_dir) == []
    assert deleted_fds_under(ext4_dir) == []
    after = op_fd_counters()
    assert after.opened - before.opened == iterations
    assert after.closed - before.closed == iterations


def test_pickling_error_mid_save_leaves_no_fd(ext4_dir):
    path = ext4_dir / "broken.pt"
    with pytest.raises(RuntimeError, match="refusing to be pickled"):
        with AioFileWriter(path, **SMALL) as writer:
            torch.save({"w": torch.randn(50000), "bad": ExplodingPickle()}, writer)
    assert writer.closed
    os.unlink(path)
    assert open_fds_under(ext4_dir) == []


def test_writer_dropped_without_close_releases_its_fd(ext4_dir):
    writer = AioFileWriter(ext4_dir / "dropped.bin", **SMALL)
    writer.write(b"x" * 100000)
    assert [entry.target for entry in open_fds_under(ext4_dir)] == [str(ext4_dir / "dropped.bin")]
    del writer
    gc.collect()
    assert open_fds_under(ext4_dir) == []


def test_fd_accounting_sees_an_unlinked_open_file(tmp_path):
    path = tmp_path / "held.bin"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY)
    try:
        os.unlink(path)
        leaked = deleted_fds_under(tmp_path)
        assert [(entry.fd, entry.target, entry.deleted) for entry in leaked] == [(fd, str(path), True)]
    finally:
        os.close(fd)
    assert deleted_fds_under(tmp_path) == []


def test_fd_accounting_matches_prefix_by_directory_not_string(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt2").mkdir()
    fd = os.open(tmp_path / "ckpt2" / "f", os.O_CREAT | os.O_WRONLY)
    try:
        assert open_fds_under(tmp_path / "ckpt") == []
        assert len(open_fds_under(tmp_path / "ckpt2")) == 1
    finally:
        os.close(fd)
