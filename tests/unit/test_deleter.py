"""Deletion refuses anything that is not our checkpoint directory, and never follows symlinks."""

import os

import pytest

from ds_fastckpt import UnsafeDeletionError
from ds_fastckpt.decisions.deleter import delete_checkpoint
from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.format.records import CheckpointRecord, scan


def make_checkpoint(save_dir, tag):
    directory = save_dir / tag
    directory.mkdir()
    (directory / MANIFEST_NAME).write_text("{}")
    (directory / "model.pt").write_bytes(b"x")
    return directory


def test_deletes_our_checkpoint_and_unlinks_symlinks_inside_without_following(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("keep")
    save_dir = tmp_path / "ckpts"
    save_dir.mkdir()
    directory = make_checkpoint(save_dir, "t1")
    os.symlink(outside, directory / "link_to_outside")
    delete_checkpoint(save_dir, CheckpointRecord(name="t1", tag="t1"))
    assert not directory.exists()
    assert (outside / "sentinel").read_text() == "keep"
    assert os.listdir(save_dir) == []


@pytest.mark.parametrize("name", ["..", ".", "", "a/b"])
def test_refuses_names_outside_save_dir(tmp_path, name):
    with pytest.raises(UnsafeDeletionError, match="not a directory name inside"):
        delete_checkpoint(tmp_path, CheckpointRecord(name=name, tag=name))


def test_refuses_a_directory_without_our_manifest(tmp_path):
    (tmp_path / "theirs").mkdir()
    with pytest.raises(UnsafeDeletionError, match="has no ds_fastckpt manifest"):
        delete_checkpoint(tmp_path, CheckpointRecord(name="theirs", tag="theirs"))
    assert (tmp_path / "theirs").is_dir()


def test_refuses_a_symlinked_directory(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / MANIFEST_NAME).write_text("{}")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(UnsafeDeletionError, match="not a real directory"):
        delete_checkpoint(tmp_path, CheckpointRecord(name="link", tag="link"))
    assert (target / MANIFEST_NAME).exists()


def test_scan_ignores_symlinks_files_and_foreign_dirs(tmp_path):
    make_checkpoint(tmp_path, "ours")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "file.txt").write_text("x")
    os.symlink(tmp_path / "ours", tmp_path / "alias")
    assert [record.name for record in scan(tmp_path)] == ["ours"]
    assert scan(tmp_path)[0].damaged  # "{}" is not a valid manifest: never deleted
