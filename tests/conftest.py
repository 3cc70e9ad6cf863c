import contextlib
import os
import subprocess

import pytest
import torch

from ds_fastckpt import op_fd_counters, open_fds_under
from ds_fastckpt.format.names import LOCK_NAME


@pytest.fixture
def no_fd_leaks(tmp_path):
    """The test ends with no descriptor into its tmp dir and the op's opens balanced by closes.

    Autouse in every folder whose tests use the op (all but ``tests/unit``), through ``check_fd_leaks``.

    The save_dir lock of an engine the test did not destroy is held on purpose until the process ends.
    """
    before = op_fd_counters()
    yield
    assert [entry for entry in open_fds_under(tmp_path) if not entry.target.endswith("/" + LOCK_NAME)] == []
    after = op_fd_counters()
    assert after.open_now == before.open_now, f"op fd counters before {before}, after {after}"


def filesystem_type(path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def restore_safe_globals():
    """Puts torch's process-wide allowlist (add_safe_globals) back as it was: tests add to it."""
    before = torch.serialization.get_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(before)


@pytest.fixture
def ext4_dir(tmp_path):
    """A directory on a filesystem that enforces O_DIRECT alignment (tmpfs does not)."""
    fs_type = filesystem_type(tmp_path)
    if fs_type in ("tmpfs", "ramfs"):
        pytest.skip(f"tmp_path {tmp_path} is on {fs_type}, which does not enforce O_DIRECT alignment")
    return tmp_path


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mounts a tmpfs (options such as 'size=1m' or 'ro') at a fresh dir; needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(name: str, options: str):
        target = tmp_path / name
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount tmpfs here: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "--lazy", str(target)], check=True)  # a test engine may hold its lock
