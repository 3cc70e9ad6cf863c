"""Small metadata files are read as untrusted: regular files only, never a symlink's target, never past a limit."""

import errno
import os

import pytest

from ds_fastckpt.format.small_files import UnsafeSmallFileError, excerpt, read_small_file
from tests.hostile_helpers import SECRET, huge, link_to_dev_zero, link_to_secret, make_fifo, promptly


def test_a_regular_file_is_read_whole(tmp_path):
    (tmp_path / "latest").write_bytes(b"global_step7\n")
    assert read_small_file(tmp_path / "latest") == b"global_step7\n"
    (tmp_path / "latest").write_bytes(b"x" * 4096)
    assert len(read_small_file(tmp_path / "latest")) == 4096


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_small_file(tmp_path / "latest")


def _read_and_count_fds(path):
    """What reading ``path`` raised (errno, filename), and the open descriptors before and after."""
    before = len(os.listdir("/proc/self/fd"))
    try:
        read_small_file(path)
    except UnsafeSmallFileError as error:
        return error.errno, error.filename, before, len(os.listdir("/proc/self/fd"))
    return None


@pytest.mark.parametrize("plant, kind, code", [(make_fifo, "a FIFO", errno.EINVAL),
                                                (link_to_dev_zero, "a symbolic link", errno.ELOOP),
                                                (link_to_secret, "a symbolic link", errno.ELOOP)])
def test_special_files_are_refused_at_once(tmp_path, plant, kind, code):
    path = tmp_path / "save" / "latest"
    path.parent.mkdir()
    plant(path)
    outcome = promptly(read_small_file, path, timeout=20)
    assert outcome.error_type == "UnsafeSmallFileError", outcome
    assert f"it is {kind}, not a regular file" in outcome.error and str(path) in outcome.error
    assert SECRET not in outcome.text and outcome.output_chars < 300
    got_errno, filename, fds_before, fds_after = promptly(_read_and_count_fds, path, timeout=20).value
    assert (got_errno, filename) == (code, str(path)) and fds_after == fds_before


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(UnsafeSmallFileError, match="it is a directory"):
        read_small_file(tmp_path)


def test_a_10_mib_file_is_not_read(tmp_path):
    path = tmp_path / "latest"
    huge(path)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(UnsafeSmallFileError, match="larger than 4096 bytes") as raised:
        read_small_file(path)
    assert raised.value.errno == errno.EFBIG and len(str(raised.value)) < 300
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(read_small_file(path, limit=10 << 20)) == 10 << 20


@pytest.mark.parametrize("content, expected", [
    ("global_step2", "'global_step2'"),
    ("a\nb\x1b[31m", r"'a\nb\x1b[31m'"),
    (b"\x00\xff", r"b'\x00\xff'"),
    ("x" * 1000, "'" + "x" * 80 + "'... (1000 characters)"),
    (b"y" * 10_000_000, "b'" + "y" * 80 + "'... (10000000 bytes)"),
])
def test_excerpt_is_short_and_escaped(content, expected):
    assert excerpt(content) == expected
