"""The keep/delete decision, as a pure function over records."""

from ds_fastckpt.decisions.retention import checkpoints_to_delete
from ds_fastckpt.format.manifest import Manifest
from ds_fastckpt.format.records import CheckpointRecord


def complete(tag, sequence, step=None):
    manifest = Manifest(tag=tag, step=step, sequence=sequence, committed_unix_ns=sequence, world_size=1,
                        deepspeed_version="x", ds_fastckpt_version="y")
    return CheckpointRecord(name=tag, tag=tag, manifest=manifest)


def names(records):
    return sorted(record.name for record in records)


def test_keep_last_zero_keeps_all_complete():
    records = [complete(f"s{i}", i) for i in range(1, 6)]
    assert checkpoints_to_delete(records, keep_last=0, keep_every=0) == []


def test_orders_by_sequence_not_name():
    records = [complete("global_step10", 10), complete("global_step9", 9), complete("global_step8", 8)]
    assert names(checkpoints_to_delete(records, keep_last=2, keep_every=0)) == ["global_step8"]


def test_keep_every_and_protected_survive():
    records = [complete(f"s{i}", i, step=i) for i in range(1, 9)]
    doomed = checkpoints_to_delete(records, keep_last=2, keep_every=3, protected_tags={"s1"})
    assert names(doomed) == ["s2", "s4", "s5"]


def test_newest_is_never_deleted_even_if_keep_last_is_met_by_protection():
    records = [complete("old", 1), complete("new", 2)]
    assert names(checkpoints_to_delete(records, keep_last=1, keep_every=0, protected_tags={"old"})) == []


def test_leftovers():
    records = [
        complete("a", 1),
        complete("b", 2),
        CheckpointRecord(name=".x.ds_fastckpt-tmp", tag="x", leftover="pending", after_sequence=1),
        CheckpointRecord(name=".y.ds_fastckpt-tmp", tag="y", leftover="pending", after_sequence=2),
        CheckpointRecord(name=".z.ds_fastckpt-tmp", tag="z", leftover="pending", after_sequence=None),
        CheckpointRecord(name=".w.ds_fastckpt-trash", tag="w", leftover="trash"),
        CheckpointRecord(name="d", tag="d", damaged="bad manifest"),
    ]
    assert names(checkpoints_to_delete(records, keep_last=5, keep_every=0)) == [
        ".w.ds_fastckpt-trash", ".x.ds_fastckpt-tmp"
    ]
