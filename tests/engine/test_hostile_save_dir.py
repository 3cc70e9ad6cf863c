"""Shared and hostile save_dirs: names planted by another user, a tag naming a user's file, a symlinked save_dir."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ds_fastckpt import InvalidTagError, SaveDirLockedError, open_fds_under
from ds_fastckpt.format.names import LOCK_NAME, MANIFEST_NAME
from tests.ds_helpers import assert_same_state, full_state, init_engine, train


@pytest.mark.parametrize("name", ["notes.txt", "zero_to_fp32.py", "a_dir"])
def test_a_tag_naming_something_not_ours_is_refused_before_anything_is_written(tmp_path, name):
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    victim = tmp_path / name
    if name == "a_dir":
        victim.mkdir()
        (victim / "data").write_text("mine")
    else:
        victim.write_text("mine")
    before = sorted(os.listdir(tmp_path))
    train(engine, 1)
    with pytest.raises(InvalidTagError, match="is not a complete ds_fastckpt checkpoint"):
        engine.save_checkpoint(tmp_path, tag=name)
    assert sorted(os.listdir(tmp_path)) == before
    assert (victim / "data" if name == "a_dir" else victim).read_text() == "mine"
    assert (tmp_path / "latest").read_text() == "global_step1"
    train(engine, 1)
    engine.save_checkpoint(tmp_path)  # the job goes on
    assert (tmp_path / "global_step3" / MANIFEST_NAME).is_file()


def test_a_tag_saved_again_replaces_our_own_checkpoint(tmp_path):
    engine = init_engine(1, {"keep_last": 0})
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="best")
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="best")
    state = full_state(engine)
    resumed = init_engine(1, {"keep_last": 0}, seed=4)
    resumed.load_checkpoint(tmp_path)
    assert_same_state(state, full_state(resumed))


def test_symlinks_planted_under_our_names_are_never_followed(tmp_path):
    """Another user of a shared save_dir links our lock's and temporary files' names to a victim's file."""
    save_dir = tmp_path / "shared"
    save_dir.mkdir()
    victim = tmp_path / "victims_file"
    victim.write_text("precious")
    (save_dir / LOCK_NAME).symlink_to(victim)
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    with pytest.raises(OSError) as raised:
        engine.save_checkpoint(save_dir)  # the lock is not taken through the link
    assert raised.value.filename == str(save_dir / LOCK_NAME)
    (save_dir / LOCK_NAME).unlink()
    # The old fixed temporary names of `latest` and of the manifest: now unused, and never opened.
    (save_dir / ".latest.ds_fastckpt-tmp").symlink_to(victim)
    engine.save_checkpoint(save_dir)
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    assert victim.read_text() == "precious"
    assert (save_dir / "latest").read_text() == "global_step2"
    assert not [name for name in os.listdir(save_dir) if name.startswith(".latest.") and name != ".latest.ds_fastckpt-tmp"]


def test_a_fifo_or_hard_link_as_the_lock_is_refused_not_waited_on(tmp_path):
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / LOCK_NAME)
    linked_dir = tmp_path / "linked"
    linked_dir.mkdir()
    victim = tmp_path / "victims_file"
    victim.write_text("precious")
    os.link(victim, linked_dir / LOCK_NAME)
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    for save_dir in (fifo_dir, linked_dir):
        with pytest.raises(OSError, match="must be a regular file with one link"):
            engine.save_checkpoint(save_dir)
    assert victim.read_text() == "precious"


def test_a_save_dir_reached_through_a_symlink(tmp_path):
    """Clusters link save_dirs to scratch space: saves, rotation and the fd audit work through the link."""
    scratch = tmp_path / "scratch" / "run1"
    scratch.mkdir(parents=True)
    link = tmp_path / "ckpts"
    link.symlink_to(scratch)
    engine = init_engine(1, {"keep_last": 2, "fd_audit": "raise"})
    for _ in range(4):
        train(engine, 1)
        engine.save_checkpoint(link)
    assert sorted(p.name for p in scratch.iterdir() if p.is_dir()) == [".global_step2.ds_fastckpt-spare",
                                                                       "global_step3", "global_step4"]
    assert [entry.target for entry in open_fds_under(link)] == [str(scratch / LOCK_NAME)]
    state = full_state(engine)
    engine.destroy()
    resumed = init_engine(1, {"keep_last": 2}, seed=2)
    path, _ = resumed.load_checkpoint(link)
    assert "global_step4" in path
    assert_same_state(state, full_state(resumed))


def test_a_second_user_cannot_take_over_a_group_shared_save_dir():
    """A second uid in a world-writable save_dir cannot take our lock, and replacing it makes our next save refuse
    rather than save beside it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as a second uid")
    shared = Path(tempfile.mkdtemp(prefix="ds_fastckpt_shared_"))  # pytest's tmp dirs are private to root
    try:
        os.chmod(shared, 0o777)
        engine = init_engine(1, {"keep_last": 1})
        train(engine, 1)
        engine.save_checkpoint(shared)
        os.chmod(shared / LOCK_NAME, 0o666)
        lock = str(shared / LOCK_NAME)
        script = ("import fcntl, os, sys, time\n"
                  f"fd = os.open({lock!r}, os.O_RDWR)\n"
                  "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    sys.exit(1)\n"
                  "except BlockingIOError:\n    print('refused', flush=True)\n"
                  f"os.unlink({lock!r})\n"
                  f"fd = os.open({lock!r}, os.O_RDWR | os.O_CREAT, 0o666)\n"
                  "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                  "os.write(fd, b'pid %d of the second user' % os.getpid())\n"
                  "print('locked', flush=True)\ntime.sleep(120)\n")
        second_user = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                        sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert second_user.stdout.readline().strip() == "refused"
            assert second_user.stdout.readline().strip() == "locked"
            train(engine, 1)
            with pytest.raises(SaveDirLockedError, match="of the second user"):
                engine.save_checkpoint(shared)
            assert sorted(p.name for p in shared.iterdir() if p.is_dir()) == ["global_step1"]
        finally:
            second_user.kill()
            second_user.wait()
        engine.destroy()
    finally:
        shutil.rmtree(shared)
