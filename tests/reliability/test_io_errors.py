"""A syscall of the save fails: the save raises with errno and path, nothing is committed, nothing complete is lost.

Data-file faults come from the op's own fault hook; faults in the commit code
(directory fsync, rename, unlink, the replace of ``latest``) from wrapping the
``os`` function for the one path under test. After each fault: ``latest``
still names the previous checkpoint, the complete checkpoints are the same as
before, the previous checkpoint resumes bit-exact, and the next save, with the
fault gone, commits normally. A failure after the commit point (removing old
checkpoints) does not fail the save: it is logged and the next save retries it.
"""

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

import pytest

from ds_fastckpt.format import atomicity
from ds_fastckpt.format.names import MANIFEST_NAME, PENDING_MARKER_NAME, PENDING_SUFFIX, TRASH_SUFFIX
from ds_fastckpt.format.records import complete_checkpoints, scan
from ds_fastckpt.native.fault_injection import inject_fault
from tests.ds_helpers import assert_same_state, full_state, init_engine, train


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class OsFault:
    """Makes hit number ``nth`` of ``os.<name>`` on a matching path fail with EIO; counts the hits."""

    def __init__(self, monkeypatch, name: str, matches, nth: int = 1):
        self.hits = 0
        original = getattr(os, name)

        def faulty(first, *args, **kwargs):
            target = self._target(name, first, args, kwargs)
            if matches(target):
                self.hits += 1
                if self.hits == nth:
                    raise OSError(errno.EIO, os.strerror(errno.EIO), target)
            return original(first, *args, **kwargs)

        monkeypatch.setattr(os, name, faulty)

    @staticmethod
    def _target(name, first, args, kwargs) -> str:
        if name == "fsync":
            return fd_path(first) if stat.S_ISDIR(os.fstat(first).st_mode) else ""
        if name in ("rename", "replace"):
            return os.fspath(args[0])  # the destination names the step
        dir_fd = kwargs.get("dir_fd")  # shutil.rmtree unlinks names relative to a directory fd
        return os.path.join(fd_path(dir_fd), first) if dir_fd is not None else os.fspath(first)


def commit_fault(monkeypatch, save_dir: Path, case: str):
    """The fault for ``case`` in the save of ``global_step2`` (or of ``same`` again, for the exchange)."""
    pending = str(save_dir / f".global_step2{PENDING_SUFFIX}")
    if case == "fsync of the pending directory":
        return OsFault(monkeypatch, "fsync", lambda path: path == pending)
    if case == "rename of the manifest":
        return OsFault(monkeypatch, "replace", lambda path: path == f"{pending}/{MANIFEST_NAME}")
    if case == "rename of the checkpoint directory":
        return OsFault(monkeypatch, "rename", lambda path: path == str(save_dir / "global_step2"))
    if case == "fsync of save_dir after the rename":
        return OsFault(monkeypatch, "fsync", lambda path: path == str(save_dir))
    if case == "replace of latest":
        return OsFault(monkeypatch, "replace", lambda path: path == str(save_dir / "latest"))
    if case == "fsync of save_dir after latest":
        return OsFault(monkeypatch, "fsync", lambda path: path == str(save_dir), nth=2)
    if case == "unlink of the pending marker":
        return OsFault(monkeypatch, "unlink", lambda path: path == f"{pending}/{PENDING_MARKER_NAME}")
    raise ValueError(case)


OP_FAULTS = {"write of a data file": "write", "fsync of a data file": "fsync"}
COMMIT_FAULTS = ["fsync of the pending directory", "rename of the manifest", "rename of the checkpoint directory",
                 "fsync of save_dir after the rename", "replace of latest", "fsync of save_dir after latest",
                 "unlink of the pending marker"]


def complete_tags(save_dir: Path):
    return [record.tag for record in complete_checkpoints(scan(save_dir))]


def assert_previous_checkpoint_resumes(save_dir: Path, expected_tag: str, expected_state: dict):
    assert (save_dir / "latest").read_text() == expected_tag
    loader = init_engine(1, {"keep_last": 2, "verify": "checksum"}, seed=5)
    load_path, _ = loader.load_checkpoint(save_dir)
    assert Path(load_path).parent.name == expected_tag
    assert_same_state(expected_state, full_state(loader))


def one_checkpoint_then_a_step(save_dir: Path, tag=None, keep_last: int = 2, recycle_retired: bool = True):
    """An engine that saved once and trained one more step, and the state that checkpoint holds."""
    engine = init_engine(1, {"keep_last": keep_last, "recycle_retired": recycle_retired})
    train(engine, 1)
    engine.save_checkpoint(save_dir, tag=tag)
    good = full_state(engine)
    train(engine, 1)
    return engine, good


@pytest.mark.parametrize("case", [*OP_FAULTS, *COMMIT_FAULTS])
def test_failed_syscall_fails_the_save_and_loses_nothing(tmp_path, monkeypatch, case):
    save_dir = tmp_path / "ckpts"
    engine, good = one_checkpoint_then_a_step(save_dir)
    with contextlib.ExitStack() as faults:
        if case in OP_FAULTS:
            faults.enter_context(inject_fault(OP_FAULTS[case], errno.EIO))
            fault = None
        else:
            fault = commit_fault(monkeypatch, save_dir, case)
        with pytest.raises(OSError) as raised:
            engine.save_checkpoint(save_dir)
        monkeypatch.undo()
    assert raised.value.errno == errno.EIO
    assert raised.value.filename and str(save_dir) in raised.value.filename
    assert fault is None or fault.hits >= 1
    assert complete_tags(save_dir) == ["global_step1"]
    assert not (save_dir / "global_step2").exists()
    assert_previous_checkpoint_resumes(save_dir, "global_step1", good)

    train(engine, 1)
    engine.save_checkpoint(save_dir)
    assert complete_tags(save_dir) == ["global_step1", "global_step3"]
    assert (save_dir / "latest").read_text() == "global_step3"
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir()) == ["global_step1", "global_step3"]
    engine.destroy()


def test_failed_exchange_keeps_the_checkpoint_it_would_replace(tmp_path, monkeypatch):
    save_dir = tmp_path / "ckpts"
    engine, good = one_checkpoint_then_a_step(save_dir, tag="same")

    def failing_exchange(first, second):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(second))

    monkeypatch.setattr(atomicity, "_exchange", failing_exchange)
    with pytest.raises(OSError) as raised:
        engine.save_checkpoint(save_dir, tag="same")
    monkeypatch.undo()
    assert raised.value.errno == errno.EIO and raised.value.filename == str(save_dir / "same")
    assert complete_tags(save_dir) == ["same"]
    assert_previous_checkpoint_resumes(save_dir, "same", good)
    engine.destroy()


def test_failed_fsync_after_an_exchange_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    save_dir = tmp_path / "ckpts"
    engine, good = one_checkpoint_then_a_step(save_dir, tag="same")
    OsFault(monkeypatch, "fsync", lambda path: path == str(save_dir))
    with pytest.raises(OSError, match="fsync"):
        engine.save_checkpoint(save_dir, tag="same")
    monkeypatch.undo()
    assert complete_tags(save_dir) == ["same"]
    assert_previous_checkpoint_resumes(save_dir, "same", good)
    engine.destroy()


def test_failed_unlink_during_rotation_keeps_the_committed_save(tmp_path, monkeypatch, caplog):
    save_dir = tmp_path / "ckpts"
    engine, _ = one_checkpoint_then_a_step(save_dir, keep_last=1, recycle_retired=False)  # rotation unlinks
    trash = str(save_dir / f".global_step1{TRASH_SUFFIX}")
    fault = OsFault(monkeypatch, "unlink", lambda path: path.startswith(trash + "/"))
    caplog.set_level(logging.ERROR, logger="ds_fastckpt")
    assert engine.save_checkpoint(save_dir)
    monkeypatch.undo()
    assert fault.hits == 1
    assert complete_tags(save_dir) == ["global_step2"] and (save_dir / "latest").read_text() == "global_step2"
    messages = [record.getMessage() for record in caplog.records]
    assert any("'global_step2' is committed, but removing old checkpoints failed" in m and trash in m
               for m in messages), messages
    assert os.path.isdir(trash)

    train(engine, 1)
    engine.save_checkpoint(save_dir)
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir()) == ["global_step3"]
    engine.destroy()
