"""The keep/delete decisions as tables: (policy, records) -> kept or deleted; pure, no filesystem."""

import builtins
import dataclasses
import os
from types import SimpleNamespace

import pytest

from ds_fastckpt import storage
from ds_fastckpt.decisions.leftovers import leftovers_to_delete
from ds_fastckpt.decisions.retention import (AnyOf, EveryNSteps, LatestN, ProtectedTags, RetentionContext,
                                             policy_from_config, unkept)
from ds_fastckpt.decisions.rotation import choose
from ds_fastckpt.engine.config import parse_fast_aio
from ds_fastckpt.format.manifest import Manifest
from ds_fastckpt.format.records import CheckpointRecord, complete_checkpoints


def complete(tag, sequence, step=None):
    manifest = Manifest(tag=tag, step=step, sequence=sequence, committed_unix_ns=sequence, world_size=1,
                        deepspeed_version="x", ds_fastckpt_version="y")
    return CheckpointRecord(name=tag, tag=tag, manifest=manifest)


def pending(tag, after_sequence):
    return CheckpointRecord(name=f".{tag}.ds_fastckpt-tmp", tag=tag, leftover="pending", after_sequence=after_sequence)


def trash(tag):
    return CheckpointRecord(name=f".{tag}.ds_fastckpt-trash", tag=tag, leftover="trash")


def steps(count):
    """s1..s<count>, committed in that order, step i at sequence i."""
    return [complete(f"s{i}", i, step=i) for i in range(1, count + 1)]


def names(records):
    return sorted(record.name for record in records)


DAMAGED = CheckpointRecord(name="d", tag="d", damaged="bad manifest")
NOT_OURS = CheckpointRecord(name="best_model", tag="best_model", not_ours="a copy of s2: not ours")
# Committed in an order their names do not sort in.
OUT_OF_NAME_ORDER = [complete("global_step10", 10), complete("global_step9", 9), complete("global_step8", 8)]

KEPT = {
    "latest 0 keeps all": (LatestN(0), steps(5), 0, ["s1", "s2", "s3", "s4", "s5"]),
    "latest 2": (LatestN(2), steps(5), 0, ["s4", "s5"]),
    "latest more than there are": (LatestN(9), steps(3), 0, ["s1", "s2", "s3"]),
    "latest by commit, not name": (LatestN(2), OUT_OF_NAME_ORDER, 0, ["global_step10", "global_step9"]),
    "latest 3, one incoming": (LatestN(3), steps(5), 1, ["s4", "s5"]),
    "latest 1, one incoming keeps none": (LatestN(1), steps(5), 1, []),
    "latest 0, one incoming keeps all": (LatestN(0), steps(3), 1, ["s1", "s2", "s3"]),
    "latest 9, one incoming": (LatestN(9), steps(3), 1, ["s1", "s2", "s3"]),
    "every 0 keeps none": (EveryNSteps(0), steps(5), 0, []),
    "every 2": (EveryNSteps(2), steps(5), 0, ["s2", "s4"]),
    "every 2 ignores incoming": (EveryNSteps(2), steps(5), 1, ["s2", "s4"]),
    "every 2 without steps": (EveryNSteps(2), OUT_OF_NAME_ORDER, 0, []),
    "protected: tags and the newest": (ProtectedTags({"s1", "s3"}), steps(5), 0, ["s1", "s3", "s5"]),
    "protected: the newest alone": (ProtectedTags(), steps(5), 0, ["s5"]),
    "protected: newest by commit": (ProtectedTags(), OUT_OF_NAME_ORDER, 0, ["global_step10"]),
    "protected: absent tag": (ProtectedTags(["nope"]), steps(2), 0, ["s2"]),
    "protected: nothing to keep": (ProtectedTags({"s1"}), [], 0, []),
    "any of nothing keeps none": (AnyOf(), steps(3), 0, []),
    "any of latest, every": (AnyOf(LatestN(2), EveryNSteps(3)), steps(8), 0, ["s3", "s6", "s7", "s8"]),
    "any of latest 0, every": (AnyOf(LatestN(0), EveryNSteps(3)), steps(4), 0, ["s1", "s2", "s3", "s4"]),
    "any of latest, protected, incoming": (AnyOf(LatestN(2), ProtectedTags({"s1"})), steps(5), 1, ["s1", "s5"]),
    "nested any of": (AnyOf(AnyOf(EveryNSteps(4)), AnyOf(LatestN(1))), steps(8), 0, ["s4", "s8"]),
}


@pytest.mark.parametrize("policy, checkpoints, incoming, kept", KEPT.values(), ids=KEPT.keys())
def test_should_keep(policy, checkpoints, incoming, kept):
    ordered = complete_checkpoints(checkpoints)
    assert sorted(policy.should_keep(ordered, RetentionContext(incoming))) == kept
    assert names(unkept(checkpoints, policy, RetentionContext(incoming))) == sorted(
        set(names(checkpoints)) - set(kept))


def test_unkept_is_in_commit_order_and_sees_only_complete_checkpoints():
    records = [*reversed(steps(4)), DAMAGED, NOT_OURS, trash("x"), pending("y", 1)]
    assert [record.name for record in unkept(records, LatestN(1))] == ["s1", "s2", "s3"]


# keep_last, keep_every -> the policy built once from the options
CONFIGS = {
    "defaults": ({}, AnyOf(LatestN(0))),
    "keep_last": ({"keep_last": 3}, AnyOf(LatestN(3))),
    "both": ({"keep_last": 2, "keep_every": 10}, AnyOf(LatestN(2), EveryNSteps(10))),
}


@pytest.mark.parametrize("section, policy", CONFIGS.values(), ids=CONFIGS.keys())
def test_policy_from_config(section, policy):
    assert policy_from_config(parse_fast_aio({"fast_aio": section}, check_host=False)) == policy
    assert policy_from_config(SimpleNamespace(**{"keep_last": 0, "keep_every": 0, **section})) == policy


@pytest.mark.parametrize("make, message", [
    (lambda: LatestN(-1), "keep_last=-1 is not allowed"),
    (lambda: EveryNSteps(-2), "keep_every=-2 is not allowed"),
    (lambda: LatestN("3"), "keep_last='3' is not allowed"),
    (lambda: LatestN(True), "keep_last=True is not allowed"),
    (lambda: RetentionContext(-1), "incoming=-1 is not allowed"),
])
def test_refused_values_name_the_key(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_policies_are_frozen_hashable_values():
    policy = AnyOf(LatestN(2), EveryNSteps(3), ProtectedTags(["a", "b"]))
    assert policy == AnyOf(LatestN(2), EveryNSteps(3), ProtectedTags({"b", "a"}))
    assert len({policy, AnyOf(LatestN(2), EveryNSteps(3), ProtectedTags(("a", "b")))}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.policies[0].n = 5


LEFTOVERS = {
    "trash always goes": ([trash("w")], [".w.ds_fastckpt-trash"]),
    "trash goes without any checkpoint": ([trash("w"), pending("p", 1)], [".w.ds_fastckpt-trash"]),
    "pending older than the newest commit goes": (
        [*steps(2), pending("x", 1), pending("y", 2), pending("z", None)], [".x.ds_fastckpt-tmp"]),
    "pending started after the newest commit stays": ([*steps(2), pending("y", 2)], []),
    "damaged and foreign never": ([*steps(3), DAMAGED, NOT_OURS], []),
    "checkpoints are no leftovers": (steps(3), []),
}


@pytest.mark.parametrize("records, deleted", LEFTOVERS.values(), ids=LEFTOVERS.keys())
def test_leftovers(records, deleted):
    assert names(leftovers_to_delete(records)) == deleted


# The whole choice: the configured policy, the protected tags, the incoming count, and the leftovers.
CHOICES = {
    "keep_last 0 deletes no checkpoint": (LatestN(0), steps(5), (), 0, []),
    "by commit, not name": (LatestN(2), OUT_OF_NAME_ORDER, (), 0, ["global_step8"]),
    "milestones and protected survive": (AnyOf(LatestN(2), EveryNSteps(3)), steps(8), {"s1"}, 0,
                                         ["s2", "s4", "s5"]),
    "the newest survives when keep_last is met by protection": (LatestN(1), [complete("old", 1),
                                                                            complete("new", 2)], {"old"}, 0, []),
    "no policy keeps only the protected and the newest": (AnyOf(), steps(4), {"s2"}, 0, ["s1", "s3"]),
    "one incoming: keep_last 3 keeps 2 old": (LatestN(3), steps(5), (), 1, ["s1", "s2", "s3"]),
    "one incoming: keep_last 2 keeps the newest": (LatestN(2), steps(3), (), 1, ["s1", "s2"]),
    # Before policies, keep_last 1 with one incoming kept every checkpoint (keep_last - 1 = 0 read as "all"),
    # so the disk guard freed less with keep_last 1 than with 2. Now it frees what the rotation after the
    # commit would delete anyway, the newest and what latest names excepted.
    "one incoming: keep_last 1 keeps the newest and the protected": (LatestN(1), steps(4), {"s1"}, 1,
                                                                     ["s2", "s3"]),
    "one incoming: keep_last 0 deletes no checkpoint": (LatestN(0), steps(4), (), 1, []),
    "one incoming: milestones survive": (AnyOf(LatestN(2), EveryNSteps(2)), steps(5), (), 1, ["s1", "s3"]),
    "leftovers do not count toward keep_last": (
        LatestN(5), [*steps(2), pending("x", 1), pending("y", 2), pending("z", None), trash("w"), DAMAGED],
        (), 0, [".w.ds_fastckpt-trash", ".x.ds_fastckpt-tmp"]),
    "leftovers of a protected tag still go": (LatestN(1), [*steps(2), trash("s2"), pending("s1", 1)], {"s1"}, 0,
                                              [".s1.ds_fastckpt-tmp", ".s2.ds_fastckpt-trash"]),
    "foreign and damaged never go": (LatestN(1), [*steps(3), NOT_OURS, DAMAGED], (), 0, ["s1", "s2"]),
}


@pytest.mark.parametrize("policy, records, protected, incoming, deleted", CHOICES.values(), ids=CHOICES.keys())
def test_choose(policy, records, protected, incoming, deleted):
    assert names(choose(records, policy, protected, incoming)) == deleted


def test_choose_lists_checkpoints_oldest_commit_first_then_leftovers():
    records = [trash("w"), *reversed(steps(4))]
    assert [record.name for record in choose(records, LatestN(1))] == ["s1", "s2", "s3", ".w.ds_fastckpt-trash"]


def test_decisions_are_pure(monkeypatch):
    """No filesystem call, no change to the records given, the same answer every time."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a decision touched the filesystem: {args}")

    for module, name in [(builtins, "open"), (os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"),
                         (os, "open"), (storage, "storage_for")]:
        monkeypatch.setattr(module, name, refuse)
    records = [*reversed(steps(6)), pending("x", 2), trash("w"), DAMAGED, NOT_OURS]
    before = list(records)
    policy = AnyOf(LatestN(2), EveryNSteps(4), ProtectedTags({"s1"}))
    answers = [names(choose(records, policy, {"s2"}, incoming)) for incoming in (0, 1, 0, 1)]
    assert answers[0] == answers[2] == [".w.ds_fastckpt-trash", ".x.ds_fastckpt-tmp", "s3"]
    assert answers[1] == answers[3] == [".w.ds_fastckpt-trash", ".x.ds_fastckpt-tmp", "s3", "s5"]
    assert sorted(policy.should_keep(complete_checkpoints(records), RetentionContext())) == ["s1", "s4", "s5", "s6"]
    assert records == before
