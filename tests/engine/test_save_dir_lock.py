"""A second job saving into the same save_dir is refused, instead of rotating the first one's checkpoints."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_fastckpt import open_fds_under
from ds_fastckpt.save_dir_lock import LOCK_NAME, SaveDirLockedError
from tests.ds_helpers import init_engine, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def other_job(tmp_path):
    """A second process that has saved into tmp_path/ckpts and is still running."""
    save_dir = tmp_path / "ckpts"
    ready = tmp_path / "saved"
    script = (f"import sys, time, pathlib; sys.path.insert(0, {str(REPO)!r})\n"
              "from tests.ds_helpers import single_process_env, init_engine, train\n"
              "single_process_env()\n"
              "engine = init_engine(1, {'keep_last': 1})\n"
              "train(engine, 1)\n"
              f"engine.save_checkpoint({str(save_dir)!r})\n"
              f"pathlib.Path({str(ready)!r}).touch()\n"
              "time.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the other job never saved"
    yield save_dir, child
    child.kill()
    child.wait()


def test_second_job_is_refused_then_free_once_the_first_dies(other_job):
    save_dir, child = other_job
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 3)
    with pytest.raises(SaveDirLockedError) as raised:
        engine.save_checkpoint(save_dir)
    assert raised.value.errno == errno.EWOULDBLOCK
    assert raised.value.filename == str(save_dir / LOCK_NAME)
    assert f"pid {child.pid}" in str(raised.value) and "another ds_fastckpt job" in str(raised.value)
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir()) == ["global_step1"]
    child.kill()
    child.wait()
    engine.save_checkpoint(save_dir)  # the kernel dropped the dead job's lock
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir()) == ["global_step3"]


def test_engines_of_one_process_share_the_lock(tmp_path):
    first = init_engine(1, {"keep_last": 2})
    train(first, 1)
    first.save_checkpoint(tmp_path)
    second = init_engine(1, {"keep_last": 2})
    train(second, 2)
    second.save_checkpoint(tmp_path)
    first.destroy()
    second.destroy()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step1", "global_step2"]
    assert open_fds_under(tmp_path) == []  # the last destroy() released the lock
