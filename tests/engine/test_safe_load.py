"""A hostile pickle in a checkpoint file is refused and never runs; client_state's common types load."""

import argparse
import datetime
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

from ds_fastckpt import CheckpointIntegrityError, UnsafeCheckpointError
from tests.ds_helpers import assert_same_state, full_state, init_engine, train


class RunsCode:
    """Unpickling this calls os.mkdir(sentinel): the stand-in for an attacker's command."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.mkdir, (str(self.sentinel), ))


class StepRecord:
    """A class of the user's own in client_state: outside every allowlist until the user admits it."""

    def __init__(self, step):
        self.step = step


@pytest.fixture
def hostile_checkpoint(tmp_path):
    engine = init_engine(1, {"keep_last": 0})
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "ckpts")
    victim = tmp_path / "ckpts" / "global_step1" / "mp_rank_00_model_states.pt"
    sentinel = tmp_path / "code_ran"
    victim.write_bytes(pickle.dumps({"module": RunsCode(sentinel)}))
    return tmp_path / "ckpts", victim, sentinel


@pytest.mark.parametrize("verify", ["off", "checksum"])
def test_hostile_pickle_is_refused_and_never_runs(hostile_checkpoint, verify):
    save_dir, victim, sentinel = hostile_checkpoint
    loader = init_engine(1, {"keep_last": 0, "verify": verify})
    # With verification on, the manifest notices the replaced file before anything is unpickled.
    expected = UnsafeCheckpointError if verify == "off" else CheckpointIntegrityError
    with pytest.raises(expected) as raised:
        loader.load_checkpoint(save_dir)
    assert str(victim) in str(raised.value)
    assert not sentinel.exists()


def test_refusal_says_how_to_opt_out(hostile_checkpoint):
    save_dir, _, sentinel = hostile_checkpoint
    with pytest.raises(UnsafeCheckpointError, match="trusted_pickles=true"):
        init_engine(1, {"keep_last": 0, "verify": "off"}).load_checkpoint(save_dir)
    assert not sentinel.exists()


def test_trusted_pickles_opts_out(hostile_checkpoint):
    save_dir, _, sentinel = hostile_checkpoint
    with pytest.raises(RuntimeError):  # not a torch archive, but it was unpickled: the code ran
        init_engine(1, {"keep_last": 0, "verify": "off", "trusted_pickles": True}).load_checkpoint(save_dir)
    assert sentinel.is_dir()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_checkpoints_load_under_the_allowlist(tmp_path, stage):
    saver = init_engine(stage, {"keep_last": 0})
    train(saver, 2)
    saver.save_checkpoint(tmp_path, client_state={"epoch": 3, "note": "text", "history": [0.5, 0.25]})
    loader = init_engine(stage, {"keep_last": 0, "verify": "checksum"}, seed=5)
    _, client_state = loader.load_checkpoint(tmp_path)
    assert_same_state(full_state(saver), full_state(loader))
    assert client_state["epoch"] == 3 and client_state["history"] == [0.5, 0.25]


def common_client_state() -> dict:
    """What users put in client_state besides numbers and strings."""
    return {
        "np_array": np.arange(12, dtype=np.float32).reshape(3, 4),
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(3),
        "rng": np.random.RandomState(11).get_state(),
        "args": argparse.Namespace(lr=0.1, name="x"),
        "path": pathlib.Path("/a/b"),
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "delta": datetime.timedelta(seconds=3),
    }


@pytest.mark.parametrize("verify", ["off", "checksum"])  # read while deserializing, or checked first then loaded
def test_client_state_of_common_types_round_trips(tmp_path, verify):
    saved = common_client_state()
    saver = init_engine(1, {"keep_last": 0})
    train(saver, 1)
    saver.save_checkpoint(tmp_path, client_state=saved)
    _, loaded = init_engine(1, {"keep_last": 0, "verify": verify}).load_checkpoint(tmp_path)
    array = loaded["np_array"]
    assert type(array) is np.ndarray and array.dtype == np.float32 and np.array_equal(array, saved["np_array"])
    for key in ("np_scalar", "np_int", "args", "path", "when", "delta"):
        assert type(loaded[key]) is type(saved[key]) and loaded[key] == saved[key], key
    assert loaded["rng"][0] == saved["rng"][0] and np.array_equal(loaded["rng"][1], saved["rng"][1])
    assert loaded["rng"][2:] == saved["rng"][2:]
    generator = np.random.RandomState()
    generator.set_state(loaded["rng"])
    assert np.array_equal(generator.random_sample(4), np.random.RandomState(11).random_sample(4))


def test_own_class_in_client_state_is_refused_until_admitted(tmp_path, restore_safe_globals):
    saver = init_engine(1, {"keep_last": 0})
    train(saver, 1)
    saver.save_checkpoint(tmp_path, client_state={"record": StepRecord(7)})
    with pytest.raises(UnsafeCheckpointError) as raised:
        init_engine(1, {"keep_last": 0}).load_checkpoint(tmp_path)
    message = str(raised.value)
    assert "mp_rank_00_model_states.pt" in message and "tests.engine.test_safe_load.StepRecord" in message
    assert "torch.serialization.add_safe_globals([tests.engine.test_safe_load.StepRecord])" in message
    assert "trusted_pickles=true" in message and "verify='checksum'" in message
    torch.serialization.add_safe_globals([StepRecord])
    _, client_state = init_engine(1, {"keep_last": 0}).load_checkpoint(tmp_path)
    assert type(client_state["record"]) is StepRecord and client_state["record"].step == 7
