"""Async saves: save_checkpoint returns at once, the commit comes later, nothing is lost or hidden."""

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ds_fastckpt
from ds_fastckpt import BackgroundWriterError
from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.native.fault_injection import inject_fault
from tests.ds_helpers import assert_same_state, full_state, init_engine, train

REPO = Path(__file__).resolve().parents[2]
ASYNC = {"keep_last": 0, "async": True}


def complete_tags(save_dir):
    return sorted(p.name for p in save_dir.iterdir() if (p / MANIFEST_NAME).is_file())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpoint_holds_the_state_at_save_although_training_went_on(tmp_path, stage):
    engine = init_engine(stage, ASYNC, seed=0)
    assert engine.checkpoint_engine.is_decoupled()
    train(engine, 3)
    engine.save_checkpoint(tmp_path)
    saved = full_state(engine)
    assert complete_tags(tmp_path) == []  # not committed until the next optimizer step
    train(engine, 2)
    assert complete_tags(tmp_path) == ["global_step3"]
    assert (tmp_path / "latest").read_text() == "global_step3"
    loader = init_engine(stage, {"keep_last": 0, "verify": "checksum"}, seed=7)
    loader.load_checkpoint(tmp_path)
    assert_same_state(saved, full_state(loader))
    engine.destroy()


def test_the_writer_is_one_named_thread(tmp_path):
    engine = init_engine(1, ASYNC)
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    assert [t.name for t in threading.enumerate() if t.name.startswith("ds_fastckpt-writer")] == [
        "ds_fastckpt-writer_0"
    ]
    engine.destroy()


def test_two_saves_without_a_step_between_commit_both(tmp_path):
    engine = init_engine(1, ASYNC)
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="a")
    engine.save_checkpoint(tmp_path, tag="b")
    assert complete_tags(tmp_path) == ["a"]
    train(engine, 1)
    assert complete_tags(tmp_path) == ["a", "b"]
    assert (tmp_path / "latest").read_text() == "b"
    engine.destroy()


def test_destroy_commits_the_checkpoint_in_flight(tmp_path):
    engine = init_engine(1, ASYNC)
    train(engine, 2)
    engine.save_checkpoint(tmp_path)
    engine.destroy()
    assert complete_tags(tmp_path) == ["global_step2"]


def test_wait_commits_now(tmp_path):
    engine = init_engine(1, ASYNC)
    train(engine, 2)
    engine.save_checkpoint(tmp_path)
    ds_fastckpt.wait(engine)
    assert complete_tags(tmp_path) == ["global_step2"]
    ds_fastckpt.wait(engine)  # nothing in flight: a no-op
    engine.destroy()


@pytest.mark.parametrize("options, saves", [({"keep_last": 0}, 1), ({"keep_last": 1, "snapshot": True}, 3)],
                         ids=["no_rotation", "rotating_snapshots"])
def test_interpreter_exit_commits_the_checkpoint_in_flight(tmp_path, options, saves):
    """With rotation, the commit at exit also retires the checkpoint before and removes the spare before that,
    work the exiting interpreter's executors refuse."""
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from tests.ds_helpers import single_process_env, init_engine, train\n"
              "single_process_env()\n"
              f"engine = init_engine(1, {{'async': True, **{options!r}}})\n"
              f"for _ in range({saves}):\n"
              "    train(engine, 1)\n"
              f"    engine.save_checkpoint({str(tmp_path)!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "could not commit" not in result.stderr, result.stderr[-4000:]
    tag = f"global_step{saves}"
    assert [name for name in complete_tags(tmp_path) if not name.startswith(".")] == [tag]  # not the spare
    assert (tmp_path / "latest").read_text() == tag
    if saves > 1:  # the spare made of global_step1 was removed at exit, global_step2 is the spare now
        assert sorted(path.name for path in tmp_path.iterdir() if "global_step" in path.name) == \
            [".global_step2.ds_fastckpt-spare", tag]


def test_background_io_error_surfaces_at_the_next_step(tmp_path):
    engine = init_engine(1, ASYNC)
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    train(engine, 1)
    with inject_fault("fsync", errno.EIO):
        engine.save_checkpoint(tmp_path)
        with pytest.raises(OSError) as raised:
            train(engine, 1)
    assert raised.value.errno == errno.EIO
    assert "global_step2.ds_fastckpt-tmp" in raised.value.filename
    assert complete_tags(tmp_path) == ["global_step1"]
    assert (tmp_path / "latest").read_text() == "global_step1"
    # The commit runs in step() before the optimizer step, so the failed step did not advance global_steps.
    engine.save_checkpoint(tmp_path)  # training goes on and the next save works
    train(engine, 1)
    assert complete_tags(tmp_path) == ["global_step1", "global_step2"]
    engine.destroy()


def test_background_pickling_error_surfaces_with_its_own_type(tmp_path):

    class Unpicklable:

        def __reduce__(self):
            raise TypeError("cannot pickle this client state")

    engine = init_engine(1, ASYNC)
    train(engine, 1)
    engine.save_checkpoint(tmp_path, client_state={"bad": Unpicklable()})
    with pytest.raises(TypeError, match="cannot pickle this client state"):
        train(engine, 1)
    assert complete_tags(tmp_path) == []
    engine.destroy()


def test_a_hung_writer_gives_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    engine = init_engine(1, {**ASYNC, "async_timeout_s": 0.5})
    write = engine.checkpoint_engine._write_file

    def slow_write(*args):
        time.sleep(2)
        return write(*args)

    monkeypatch.setattr(engine.checkpoint_engine, "_write_file", slow_write)
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    started = time.monotonic()
    with pytest.raises(BackgroundWriterError, match="did not finish checkpoint 'global_step1' within 0.5 s"):
        train(engine, 1)
    assert time.monotonic() - started < 1.5
    assert complete_tags(tmp_path) == []
    engine.destroy()


def test_snapshot_keeps_the_state_at_save_even_if_tensors_change(tmp_path):
    engine = init_engine(0, {**ASYNC, "snapshot": True})
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    saved = full_state(engine)
    with torch.no_grad():
        for param in engine.module.parameters():
            param.add_(1.0)
    ds_fastckpt.wait(engine)
    loader = init_engine(0, {"keep_last": 0}, seed=7)
    loader.load_checkpoint(tmp_path)
    assert torch.equal(full_state(loader)["module.0.weight"], saved["module.0.weight"])
    engine.destroy()


def test_with_snapshot_training_goes_on_while_the_writes_run_and_commits_once_they_end(tmp_path, monkeypatch):
    engine = init_engine(1, {**ASYNC, "snapshot": True})
    write, release = engine.checkpoint_engine._write_file, threading.Event()

    def held_write(*args):
        release.wait(60)
        return write(*args)

    monkeypatch.setattr(engine.checkpoint_engine, "_write_file", held_write)
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    saved = full_state(engine)
    started = time.monotonic()
    train(engine, 2)  # two optimizer steps while no file is written
    assert time.monotonic() - started < 30 and engine.global_steps == 3
    assert complete_tags(tmp_path) == []
    release.set()
    deadline = time.monotonic() + 60
    while complete_tags(tmp_path) == [] and time.monotonic() < deadline:
        train(engine, 1)  # each step's boundary asks whether every write has ended
    assert complete_tags(tmp_path) == ["global_step1"]
    loader = init_engine(1, {"keep_last": 0, "verify": "checksum"}, seed=7)
    loader.load_checkpoint(tmp_path, tag="global_step1")
    assert_same_state(saved, full_state(loader))
    engine.destroy()


def test_a_file_beyond_snapshot_max_bytes_is_written_before_save_returns(tmp_path, caplog):
    engine = init_engine(0, {**ASYNC, "snapshot": True, "snapshot_max_bytes": 1})
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    saved = full_state(engine)
    assert "left of snapshot_max_bytes=1; writing this file now" in caplog.text
    pending = tmp_path / ".global_step1.ds_fastckpt-tmp"
    assert sorted(path.name for path in pending.iterdir() if path.suffix == ".pt") == ["mp_rank_00_model_states.pt"]
    with torch.no_grad():
        for param in engine.module.parameters():
            param.add_(1.0)
    ds_fastckpt.wait(engine)
    loader = init_engine(0, {"keep_last": 0}, seed=7)
    loader.load_checkpoint(tmp_path)
    assert torch.equal(full_state(loader)["module.0.weight"], saved["module.0.weight"])
    engine.destroy()


def test_kill_during_a_background_write_keeps_the_previous_checkpoint(tmp_path):
    ready = tmp_path / "writing"
    save_dir = tmp_path / "ckpts"
    script = (f"import sys, time, pathlib; sys.path.insert(0, {str(REPO)!r})\n"
              "from tests.ds_helpers import single_process_env, init_engine, train\n"
              "import ds_fastckpt\n"
              "single_process_env()\n"
              "engine = init_engine(1, {'keep_last': 0, 'async': True})\n"
              "train(engine, 1)\n"
              f"engine.save_checkpoint({str(save_dir)!r})\n"
              "ds_fastckpt.wait(engine)\n"
              "write = engine.checkpoint_engine._write_file\n"
              "def stalled(*args):\n"
              f"    pathlib.Path({str(ready)!r}).touch()\n"
              "    write(*args)\n"
              "    time.sleep(600)\n"
              "engine.checkpoint_engine._write_file = stalled\n"
              "train(engine, 1)\n"
              f"engine.save_checkpoint({str(save_dir)!r})\n"
              "time.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the child never started its background write"
        time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    assert complete_tags(save_dir) == ["global_step1"]
    assert (save_dir / ".global_step2.ds_fastckpt-tmp").is_dir()
    loader = init_engine(1, {"keep_last": 0, "verify": "checksum"}, seed=7)
    load_path, _ = loader.load_checkpoint(save_dir)
    assert "global_step1" in load_path and loader.global_steps == 1
