"""A second job saving into the same save_dir is refused, instead of rotating the first one's checkpoints."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_fastckpt import open_fds_under
from ds_fastckpt.format.names import LOCK_NAME
from ds_fastckpt.format.save_dir_lock import SaveDirLockedError
from tests.ds_helpers import init_engine, train

REPO = Path(__file__).resolve().parents[2]


def start_job(save_dir: Path, ready: Path, fork_a_worker: bool = False) -> subprocess.Popen:
    """A second process that saves into ``save_dir``, touches ``ready`` and sleeps.

    With ``fork_a_worker`` it forks a child after its save, as a data-loader
    worker or multiprocessing with fork would, and writes the child's pid
    into ``ready``.
    """
    script = (f"import os, sys, time, pathlib; sys.path.insert(0, {str(REPO)!r})\n"
              "from tests.ds_helpers import single_process_env, init_engine, train\n"
              "single_process_env()\n"
              "engine = init_engine(1, {'keep_last': 1})\n"
              "train(engine, 1)\n"
              f"engine.save_checkpoint({str(save_dir)!r})\n"
              f"worker = os.fork() if {fork_a_worker} else -1\n"
              "if worker == 0:\n"
              "    time.sleep(600)\n"
              "    os._exit(0)\n"
              f"pathlib.Path({str(ready)!r}).write_text(str(worker))\n"
              "time.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the other job never saved"
    return child


@pytest.fixture
def other_job(tmp_path):
    """A second process that has saved into tmp_path/ckpts and is still running."""
    save_dir = tmp_path / "ckpts"
    child = start_job(save_dir, tmp_path / "saved")
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
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir()) == [".global_step1.ds_fastckpt-spare",
                                                                        "global_step3"]


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


def test_a_removed_lock_file_is_locked_again_at_the_next_save(tmp_path):
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    (tmp_path / LOCK_NAME).unlink()
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    assert f"pid {os.getpid()} " in (tmp_path / LOCK_NAME).read_text()
    assert [entry.target for entry in open_fds_under(tmp_path)] == [str(tmp_path / LOCK_NAME)]  # old one closed
    job = subprocess.run([sys.executable, "-c", (
        f"import sys, fcntl, os; fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n")])
    assert job.returncode == 3  # locked again by us
    engine.destroy()


def test_a_job_that_locked_a_replaced_lock_file_first_refuses_ours(tmp_path):
    save_dir = tmp_path / "ckpts"
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    (save_dir / LOCK_NAME).unlink()  # by hand, under a running job
    job = start_job(save_dir, tmp_path / "saved")
    try:
        train(engine, 1)
        with pytest.raises(SaveDirLockedError, match=f"pid {job.pid}"):
            engine.save_checkpoint(save_dir)
    finally:
        job.kill()
        job.wait()
    engine.destroy()


def test_a_forked_worker_does_not_keep_a_dead_jobs_lock(tmp_path):
    save_dir = tmp_path / "ckpts"
    ready = tmp_path / "saved"
    job = start_job(save_dir, ready, fork_a_worker=True)
    worker = int(ready.read_text())
    try:
        job.kill()
        job.wait()
        os.kill(worker, 0)  # the forked worker outlives the job, as an orphan
        engine = init_engine(1, {"keep_last": 1})
        train(engine, 3)
        engine.save_checkpoint(save_dir)  # not refused
        assert (save_dir / "global_step3").is_dir()
        engine.destroy()
    finally:
        os.kill(worker, 9)
