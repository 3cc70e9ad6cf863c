"""Rotation keeps the newest keep_last complete checkpoints by commit order and touches nothing else."""

import os
import threading

from ds_fastckpt import deleted_fds_under, open_fds_under
from ds_fastckpt.decisions import rotation
from ds_fastckpt.format.names import LOCK_NAME
from tests.ds_helpers import deepspeed_scripts, init_engine, train

SCRIPTS = deepspeed_scripts()


def checkpoint_dirs(save_dir):
    return sorted(p.name for p in save_dir.iterdir() if p.is_dir() and not p.name.startswith("unrelated"))


def test_keep_last_2_over_10_saves_keeps_the_2_newest(tmp_path):
    (tmp_path / "unrelated_dir").mkdir()
    (tmp_path / "unrelated_dir" / "notes.txt").write_text("mine")
    (tmp_path / "unrelated.txt").write_text("also mine")
    engine = init_engine(1, {"keep_last": 2})
    for _ in range(10):
        train(engine, 1)
        engine.save_checkpoint(tmp_path)
    # The newest retired checkpoint stays as the spare the next save writes over (recycle_retired).
    assert checkpoint_dirs(tmp_path) == [".global_step8.ds_fastckpt-spare", "global_step10", "global_step9"]
    assert (tmp_path / "unrelated_dir" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "unrelated.txt").read_text() == "also mine"
    assert all((tmp_path / script).is_file() for script in SCRIPTS)
    assert (tmp_path / "latest").read_text() == "global_step10"


def test_keep_every_keeps_milestones(tmp_path):
    engine = init_engine(1, {"keep_last": 2, "keep_every": 4})
    for _ in range(10):
        train(engine, 1)
        engine.save_checkpoint(tmp_path)
    assert checkpoint_dirs(tmp_path) == ["global_step10", "global_step4", "global_step8", "global_step9"]


def test_order_is_by_commit_not_by_tag_name(tmp_path):
    engine = init_engine(1, {"keep_last": 2})
    for tag in ["b", "a", "c9", "c10"]:
        train(engine, 1)
        engine.save_checkpoint(tmp_path, tag=tag)
    assert checkpoint_dirs(tmp_path) == [".a.ds_fastckpt-spare", "c10", "c9"]
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="a")
    assert checkpoint_dirs(tmp_path) == [".c9.ds_fastckpt-spare", "a", "c10"]


def test_keep_last_1_keeps_the_new_one_and_what_latest_names(tmp_path):
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="first")
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="second", save_latest=False)
    assert (tmp_path / "latest").read_text() == "first"
    assert checkpoint_dirs(tmp_path) == ["first", "second"]
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="third")
    assert checkpoint_dirs(tmp_path) == [".second.ds_fastckpt-spare", "third"]


def test_leftovers_do_not_count_and_are_cleaned_after_a_newer_commit(tmp_path):
    engine = init_engine(1, {"keep_last": 2})
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    leftover = tmp_path / ".global_step99.ds_fastckpt-tmp"
    leftover.mkdir()
    (leftover / ".ds_fastckpt_pending.json").write_text('{"format": 1, "tag": "global_step99", "after_sequence": 1}')
    (leftover / "half_written.pt").write_bytes(b"x" * 100)
    assert engine.load_checkpoint(tmp_path)[0].endswith("global_step1/mp_rank_00_model_states.pt")
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    assert not leftover.exists()
    assert checkpoint_dirs(tmp_path) == ["global_step1", "global_step2"]


def test_symlinked_tag_dir_is_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ds_fastckpt_manifest.json").write_text("{}")
    (outside / "sentinel").write_text("keep me")
    save_dir = tmp_path / "ckpts"
    save_dir.mkdir()
    os.symlink(outside, save_dir / "global_step0")
    engine = init_engine(1, {"keep_last": 1})
    for _ in range(3):
        train(engine, 1)
        engine.save_checkpoint(save_dir)
    assert (outside / "sentinel").read_text() == "keep me"
    assert os.path.islink(save_dir / "global_step0")


def test_fifty_save_rotate_cycles_leave_no_fd(tmp_path):
    engine = init_engine(1, {"keep_last": 2, "fd_audit": "raise"})
    for _ in range(50):
        train(engine, 1)
        engine.save_checkpoint(tmp_path)
        assert deleted_fds_under(tmp_path) == []
    assert [entry.target for entry in open_fds_under(tmp_path)] == [str(tmp_path / LOCK_NAME)]  # held on purpose
    assert checkpoint_dirs(tmp_path) == [".global_step48.ds_fastckpt-spare", "global_step49", "global_step50"]


def test_background_delete_retires_at_once_and_unlinks_on_the_remover_thread(tmp_path, monkeypatch):
    removed_on = []
    remove = rotation.remove_retired

    def watched_remove(trash):
        removed_on.append(threading.current_thread().name)
        remove(trash)

    monkeypatch.setattr(rotation, "remove_retired", watched_remove)
    engine = init_engine(1, {"keep_last": 1, "background_delete": True, "recycle_retired": False})
    for _ in range(3):
        train(engine, 1)
        engine.save_checkpoint(tmp_path)
        # Renamed away before the save returned: only the newest is a checkpoint; a trash dir may linger.
        assert [name for name in checkpoint_dirs(tmp_path) if not name.endswith("-trash")] == [
            f"global_step{engine.global_steps}"]
    engine.destroy()  # waits for the removals
    assert checkpoint_dirs(tmp_path) == ["global_step3"]
    assert removed_on == ["ds_fastckpt-remover_0"] * 2
    assert deleted_fds_under(tmp_path) == []
