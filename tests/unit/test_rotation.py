"""The rotation routine on a real save_dir: it deletes what the policy chooses, and nothing that is not ours."""

import concurrent.futures
import json
import logging
import os
import subprocess

import pytest

from ds_fastckpt import UnsafeDeletionError
from ds_fastckpt.decisions.retention import AnyOf, EveryNSteps, LatestN
from ds_fastckpt.decisions.rotation import Rotation
from ds_fastckpt.faults import save_points
from ds_fastckpt.format.names import LATEST_NAME, MANIFEST_NAME, PENDING_MARKER_NAME
from ds_fastckpt.format.records import scan
from tests.unit.committed import commit


def pending(save_dir, tag, after_sequence):
    directory = save_dir / f".{tag}.ds_fastckpt-tmp"
    directory.mkdir()
    (directory / PENDING_MARKER_NAME).write_text(json.dumps({"format": 1, "tag": tag,
                                                             "after_sequence": after_sequence}))
    (directory / "half_written.pt").write_bytes(b"x" * 100)
    return directory


def entries(save_dir):
    return sorted(os.listdir(save_dir))


@pytest.fixture
def save_dir(tmp_path):
    """global_step1..4, committed in that order."""
    save_dir = tmp_path / "ckpts"
    save_dir.mkdir()
    for sequence in range(1, 5):
        commit(save_dir, f"global_step{sequence}", sequence, step=sequence)
    return save_dir


@pytest.fixture
def points():
    reached = []
    save_points.on_reached(reached.append)
    yield reached
    save_points.on_reached(None)


class DeferredSubmit:
    """A ``submit`` whose work runs only when the test says: removals still running, held still."""

    def __init__(self):
        self.calls = []

    def __call__(self, function, *args):
        future = concurrent.futures.Future()
        self.calls.append((future, function, args))
        return future

    def run_all(self):
        for future, function, args in self.calls:
            try:
                future.set_result(function(*args))
            except Exception as error:  # handed to the future, as an executor does
                future.set_exception(error)


def test_deletes_what_the_policy_chooses(save_dir, points):
    doomed = Rotation(AnyOf(LatestN(1), EveryNSteps(2))).apply(save_dir, protected={"global_step1"})
    assert [record.name for record in doomed] == ["global_step3"]
    assert entries(save_dir) == ["global_step1", "global_step2", "global_step4"]
    assert points == ["mid_rotation"]


def test_protects_what_latest_names_and_the_newest(save_dir):
    (save_dir / LATEST_NAME).write_text("global_step2")
    rotation = Rotation(LatestN(1))
    assert [record.name for record in rotation.choose(save_dir)] == ["global_step1", "global_step3"]
    assert entries(save_dir) == ["global_step1", "global_step2", "global_step3", "global_step4", LATEST_NAME]
    rotation.apply(save_dir)
    assert entries(save_dir) == ["global_step2", "global_step4", LATEST_NAME]


def test_nothing_chosen_touches_nothing(save_dir, points):
    assert Rotation(LatestN(0)).apply(save_dir) == []
    assert entries(save_dir) == ["global_step1", "global_step2", "global_step3", "global_step4"]
    assert points == []  # no rotation happened, so no crash point either


def test_retires_all_then_syncs_before_removing_any(save_dir, monkeypatch):
    seen = {}
    monkeypatch.setattr(save_points, "reached", lambda point: seen.setdefault(point, entries(save_dir)))
    Rotation(LatestN(2)).apply(save_dir)
    assert seen["mid_rotation"] == [".global_step1.ds_fastckpt-trash", ".global_step2.ds_fastckpt-trash",
                                    "global_step3", "global_step4"]
    assert entries(save_dir) == ["global_step3", "global_step4"]


def test_leftovers_go_and_do_not_count(save_dir):
    stale = pending(save_dir, "global_step9", after_sequence=3)
    started_after = pending(save_dir, "global_step5", after_sequence=4)
    (save_dir / ".global_step0.ds_fastckpt-trash").mkdir()
    doomed = Rotation(LatestN(3)).apply(save_dir)
    assert [record.name for record in doomed] == ["global_step1", ".global_step0.ds_fastckpt-trash", stale.name]
    assert entries(save_dir) == [started_after.name, "global_step2", "global_step3", "global_step4"]


def test_never_deletes_a_directory_without_our_manifest(save_dir):
    foreign = save_dir / "global_step0"  # a checkpoint name, but no manifest: someone else's
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    subprocess.run(["cp", "-r", str(save_dir / "global_step1"), str(save_dir / "best_model")], check=True)
    damaged = commit(save_dir, "global_step_damaged", 0)
    (damaged / MANIFEST_NAME).write_text("{not json")
    (save_dir / "loose_file").write_text("mine too")
    Rotation(LatestN(1)).apply(save_dir)
    assert entries(save_dir) == ["best_model", "global_step0", "global_step4", "global_step_damaged", "loose_file"]
    assert (foreign / "notes.txt").read_text() == "mine"
    assert (save_dir / "best_model" / "model.pt").read_bytes() == b"weights"


def test_never_follows_a_symlink(save_dir, tmp_path):
    outside = tmp_path / "outside"
    commit(tmp_path, "outside", 0)
    (outside / "sentinel").write_text("keep me")
    os.symlink(outside, save_dir / "outside")  # a symlinked "checkpoint" whose manifest matches its name
    os.symlink(outside, save_dir / "global_step1" / "link_to_outside")  # a symlink inside one that goes
    Rotation(LatestN(1)).apply(save_dir)
    assert entries(save_dir) == ["global_step4", "outside"]
    assert os.path.islink(save_dir / "outside")
    assert (outside / "sentinel").read_text() == "keep me" and (outside / "model.pt").is_file()


def test_refuses_a_chosen_directory_that_became_a_symlink(save_dir, tmp_path, monkeypatch):
    rotation = Rotation(LatestN(3))
    chosen = rotation.scan(save_dir)  # global_step1 is chosen from these
    target = tmp_path / "elsewhere"
    (save_dir / "global_step1").rename(target)
    os.symlink(target, save_dir / "global_step1")
    monkeypatch.setattr(rotation, "scan", lambda _: chosen)  # a scan that ran before the swap
    with pytest.raises(UnsafeDeletionError, match="not a real directory"):
        rotation.apply(save_dir)
    assert (target / MANIFEST_NAME).is_file() and os.path.islink(save_dir / "global_step1")


def test_submits_removals_and_tracks_them_until_they_end(save_dir):
    submit = DeferredSubmit()
    rotation = Rotation(LatestN(2))
    doomed = rotation.apply(save_dir, submit=submit)
    assert [record.name for record in doomed] == ["global_step1", "global_step2"]
    trash = [save_dir / ".global_step1.ds_fastckpt-trash", save_dir / ".global_step2.ds_fastckpt-trash"]
    assert rotation.removing() == trash and all(path.is_dir() for path in trash)  # retired, not yet removed
    assert [record.name for record in rotation.scan(save_dir)] == ["global_step3", "global_step4"]
    assert {record.name for record in scan(save_dir)} >= {path.name for path in trash}
    assert rotation.apply(save_dir, submit=submit) == []  # a removal still running is never chosen again
    submit.run_all()
    rotation.finish_removals()
    assert rotation.removing() == [] and entries(save_dir) == ["global_step3", "global_step4"]


def test_removes_on_a_real_executor(save_dir):
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        rotation = Rotation(LatestN(1))
        assert len(rotation.apply(save_dir, submit=executor.submit)) == 3
        rotation.finish_removals()
    assert entries(save_dir) == ["global_step4"]


def test_a_failed_background_removal_is_logged_and_retried(save_dir, caplog):
    def fail(function, *args):
        future = concurrent.futures.Future()
        future.set_exception(PermissionError(13, "Permission denied", str(args[0])))
        return future

    rotation = Rotation(LatestN(3))
    rotation.apply(save_dir, submit=fail)
    with caplog.at_level(logging.WARNING, logger="ds_fastckpt.decisions.rotation"):
        rotation.finish_removals()
    assert "could not be removed" in caplog.text and "Permission denied" in caplog.text
    assert ".global_step1.ds_fastckpt-trash" in entries(save_dir)
    assert [record.name for record in rotation.apply(save_dir)] == [".global_step1.ds_fastckpt-trash"]
    assert entries(save_dir) == ["global_step2", "global_step3", "global_step4"]


def test_make_room_counts_the_incoming_checkpoint(save_dir):
    submit = DeferredSubmit()
    rotation = Rotation(LatestN(3))
    rotation.apply(save_dir, submit=submit)  # global_step1 retired, its removal still running
    submit.run_all()
    assert rotation.make_room(save_dir) == 1  # keeps 2 existing: the new one will be the third
    assert rotation.removing() == [] and entries(save_dir) == ["global_step3", "global_step4"]


def test_make_room_with_keep_last_1_keeps_the_newest_and_latest(save_dir):
    (save_dir / LATEST_NAME).write_text("global_step2")
    assert Rotation(LatestN(1)).make_room(save_dir) == 2
    assert entries(save_dir) == ["global_step2", "global_step4", LATEST_NAME]


def test_choose_deletes_nothing(save_dir):
    rotation = Rotation(LatestN(1))
    assert [record.name for record in rotation.choose(save_dir, incoming=1)] == [
        "global_step1", "global_step2", "global_step3"]
    assert entries(save_dir) == ["global_step1", "global_step2", "global_step3", "global_step4"]


def test_keep_spare_retires_the_newest_chosen_to_its_spare_name_and_removes_the_rest(save_dir, points):
    (save_dir / "global_step2" / "model.pt").write_bytes(b"blocks to write over")
    doomed = Rotation(LatestN(2)).apply(save_dir, keep_spare=True)
    assert [record.name for record in doomed] == ["global_step1", "global_step2"]
    assert entries(save_dir) == [".global_step2.ds_fastckpt-spare", "global_step3", "global_step4"]
    assert (save_dir / ".global_step2.ds_fastckpt-spare" / "model.pt").read_bytes() == b"blocks to write over"
    assert points == ["mid_rotation"]
    spare = [record for record in scan(save_dir) if record.leftover]
    assert [(record.name, record.tag, record.leftover, record.complete) for record in spare] == [
        (".global_step2.ds_fastckpt-spare", "global_step2", "spare", False)]


def test_the_next_rotation_removes_the_spare_and_keeps_a_newer_one(save_dir):
    rotation = Rotation(LatestN(2))
    rotation.apply(save_dir, keep_spare=True)
    commit(save_dir, "global_step5", 5, step=5)
    rotation.apply(save_dir, keep_spare=True)
    assert entries(save_dir) == [".global_step3.ds_fastckpt-spare", "global_step4", "global_step5"]
    rotation.apply(save_dir, keep_spare=True)  # nothing retired: the spare had its save, and goes
    assert entries(save_dir) == ["global_step4", "global_step5"]


def test_without_keep_spare_a_spare_goes_with_the_leftovers(save_dir):
    rotation = Rotation(LatestN(3))
    rotation.apply(save_dir, keep_spare=True)
    assert entries(save_dir)[0] == ".global_step1.ds_fastckpt-spare"
    assert rotation.make_room(save_dir) == 2  # the disk guard: the spare and global_step2 go, none is kept
    assert entries(save_dir) == ["global_step3", "global_step4"]


def test_a_spare_is_never_made_of_what_is_not_ours(save_dir):
    subprocess.run(["cp", "-r", str(save_dir / "global_step1"), str(save_dir / "best_model")], check=True)
    os.symlink(save_dir / "global_step2", save_dir / "linked")
    Rotation(LatestN(1)).apply(save_dir, keep_spare=True)
    assert entries(save_dir) == [".global_step3.ds_fastckpt-spare", "best_model", "global_step4", "linked"]
