"""The disk guard frees the spare before any checkpoint keep_last keeps, and counts a spare it writes over as room.

The disk here holds keep_last + 1 checkpoints: between saves the spare takes the "+ 1", so a save starts with
less free space than a checkpoint. A save that then fails must still leave the keep_last checkpoints.
"""

import pytest

from ds_fastckpt.faults import save_points
from tests.ds_helpers import assert_same_state, full_state, init_engine, train
from tests.engine.test_disk_guard import WIDTH, checkpoint_bytes


class InjectedFailure(RuntimeError):
    pass


@pytest.fixture
def fail_before_commit():
    """Call it, and every save after fails once all its files are written, before its manifest: never committed."""

    def fail(point):
        if point == "before_commit_record":
            raise InjectedFailure("injected failure before the commit record")

    yield lambda: save_points.on_reached(fail)
    save_points.on_reached(None)


def checkpoints(save_dir):
    return sorted(entry.name for entry in save_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def spare_disk(tmp_path, mount_tmpfs, keep_last):
    """A tmpfs for keep_last + 1 checkpoints (and half of one for the small files)."""
    return mount_tmpfs("small", f"size={int(checkpoint_bytes(tmp_path) * (keep_last + 1.5))}")


def save_three(save_dir, fast_aio):
    """global_step1..3 with keep_last 2 and recycling: global_step1 is the spare; returns global_step3's state."""
    engine = init_engine(1, {"keep_last": 2, **fast_aio}, width=WIDTH)
    for _ in range(3):
        train(engine, 1)
        engine.save_checkpoint(save_dir)
    assert checkpoints(save_dir) == ["global_step2", "global_step3"]
    assert (save_dir / ".global_step1.ds_fastckpt-spare").is_dir()
    return engine


def test_a_failed_save_that_recycles_the_spare_leaves_the_keep_last_checkpoints(tmp_path, mount_tmpfs,
                                                                              fail_before_commit):
    save_dir = spare_disk(tmp_path, mount_tmpfs, keep_last=2)
    engine = save_three(save_dir, {})
    newest = full_state(engine)
    train(engine, 1)
    fail_before_commit()
    with pytest.raises(Exception, match="injected failure"):
        engine.save_checkpoint(save_dir)
    engine.destroy()
    assert checkpoints(save_dir) == ["global_step2", "global_step3"]  # keep_last 2: both still there
    assert (save_dir / "latest").read_text() == "global_step3"
    resumed = init_engine(1, {"keep_last": 2}, seed=3, width=WIDTH)
    path, _ = resumed.load_checkpoint(save_dir)
    assert "global_step3" in path
    assert_same_state(newest, full_state(resumed))
    resumed.destroy()


def test_the_spare_alone_is_freed_when_that_makes_room(tmp_path, mount_tmpfs, fail_before_commit):
    save_dir = spare_disk(tmp_path, mount_tmpfs, keep_last=2)
    save_three(save_dir, {}).destroy()
    # The same save_dir resumed without recycling: the spare is not written over, so it has to go, and only it.
    engine = init_engine(1, {"keep_last": 2, "recycle_retired": False}, seed=3, width=WIDTH)
    engine.load_checkpoint(save_dir)
    train(engine, 1)
    fail_before_commit()
    with pytest.raises(Exception, match="injected failure"):
        engine.save_checkpoint(save_dir)
    engine.destroy()
    assert checkpoints(save_dir) == ["global_step2", "global_step3"]
    assert not (save_dir / ".global_step1.ds_fastckpt-spare").exists()
