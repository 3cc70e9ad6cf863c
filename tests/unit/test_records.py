"""What scan() counts as ours: a manifest naming its own directory, or our leftover names; nothing else."""

import json
import subprocess

import pytest

from ds_fastckpt.decisions.retention import AnyOf, EveryNSteps, LatestN
from ds_fastckpt.decisions.rotation import choose
from ds_fastckpt.format.names import MANIFEST_NAME, PENDING_MARKER_NAME
from ds_fastckpt.format.records import complete_checkpoints, scan
from tests.hostile_helpers import link_to_dev_zero, make_fifo, nested_json, promptly
from tests.unit.committed import commit


def pending(save_dir, tag, marker_tag, after_sequence=1):
    directory = save_dir / f".{tag}.ds_fastckpt-tmp"
    directory.mkdir()
    (directory / PENDING_MARKER_NAME).write_text(json.dumps({"format": 1, "tag": marker_tag,
                                                             "after_sequence": after_sequence}))
    return directory


def by_name(records):
    return {record.name: record for record in records}


@pytest.fixture
def save_dir(tmp_path):
    save_dir = tmp_path / "ckpts"
    save_dir.mkdir()
    for sequence in (1, 2):
        commit(save_dir, f"global_step{sequence}", sequence, step=sequence)
    return save_dir


def test_a_cp_r_copy_is_not_ours(save_dir):
    subprocess.run(["cp", "-r", str(save_dir / "global_step2"), str(save_dir / "best_model")], check=True)
    assert [record.name for record in scan(save_dir)] == ["global_step1", "global_step2"]
    records = by_name(scan(save_dir, include_not_ours=True))
    copy = records["best_model"]
    assert not copy.complete and copy.leftover is None and copy.damaged is None
    assert "'global_step2'" in copy.not_ours and "not ours" in copy.not_ours
    assert [record.name for record in complete_checkpoints(records.values())] == ["global_step1", "global_step2"]
    assert choose(list(records.values()), LatestN(1)) == [records["global_step1"]]


def test_a_renamed_checkpoint_is_not_ours(save_dir):
    (save_dir / "global_step1").rename(save_dir / "global_step7")
    assert [record.name for record in scan(save_dir)] == ["global_step2"]
    assert by_name(scan(save_dir, include_not_ours=True))["global_step7"].not_ours


def test_a_cp_r_of_the_whole_save_dir_is_a_consistent_save_dir(save_dir, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(save_dir), str(copy)], check=True)
    records = scan(copy, include_not_ours=True)
    assert [(record.name, record.complete, record.not_ours) for record in records] == [
        ("global_step1", True, None), ("global_step2", True, None)]
    assert [record.name for record in choose(records, LatestN(1))] == ["global_step1"]


def test_leftovers_whose_metadata_names_another_tag_are_not_ours(save_dir):
    pending(save_dir, "global_step3", "global_step3", after_sequence=1)
    pending(save_dir, "mine", "global_step3", after_sequence=1)  # a copy of a pending dir
    trash = save_dir / ".mine2.ds_fastckpt-trash"
    subprocess.run(["cp", "-r", str(save_dir / "global_step1"), str(trash)], check=True)
    records = by_name(scan(save_dir, include_not_ours=True))
    assert records[".global_step3.ds_fastckpt-tmp"].leftover == "pending"
    assert records[".global_step3.ds_fastckpt-tmp"].after_sequence == 1
    assert "pending marker names checkpoint 'global_step3', not 'mine'" in records[".mine.ds_fastckpt-tmp"].not_ours
    assert f"{MANIFEST_NAME} names checkpoint 'global_step1', not 'mine2'" in records[trash.name].not_ours
    doomed = choose(list(records.values()), LatestN(0))
    assert [record.name for record in doomed] == [".global_step3.ds_fastckpt-tmp"]


def test_leftovers_without_readable_metadata_stay_ours(save_dir):
    (save_dir / ".a.ds_fastckpt-trash").mkdir()  # a deletion that removed the manifest already
    make_fifo(pending(save_dir, "b", "b") / PENDING_MARKER_NAME)
    records = by_name(promptly(scan, save_dir, timeout=20).value)
    assert records[".a.ds_fastckpt-trash"].leftover == "trash"
    assert records[".b.ds_fastckpt-tmp"].leftover == "pending" and records[".b.ds_fastckpt-tmp"].after_sequence is None


@pytest.mark.parametrize("damage", ["nested", "string step", "fifo", "dev_zero", "escaping path"])
def test_damaged_manifests_never_raise_out_of_scan_or_rotation(save_dir, damage):
    manifest = save_dir / "global_step1" / MANIFEST_NAME
    data = json.loads(manifest.read_bytes())
    if damage == "nested":
        manifest.write_bytes(nested_json())
    elif damage == "string step":
        manifest.write_text(json.dumps({**data, "step": "1"}))
    elif damage == "fifo":
        make_fifo(manifest)
    elif damage == "dev_zero":
        link_to_dev_zero(manifest)
    else:
        manifest.write_text(json.dumps({**data, "files": [{"path": "../../etc/passwd", "bytes": 1, "crc32c": 1}]}))
    outcome = promptly(_scan_and_rotate, save_dir, timeout=20)
    assert outcome.error_type is None, outcome
    records, doomed = outcome.value
    assert records["global_step1"].damaged and str(manifest) in records["global_step1"].damaged
    assert records["global_step2"].complete and doomed == []


def _scan_and_rotate(save_dir):
    records = scan(save_dir)
    return by_name(records), choose(records, AnyOf(LatestN(1), EveryNSteps(2)))
