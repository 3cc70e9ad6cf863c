"""A checkpoint file replaced by a hostile pickle is refused, and its code never runs."""

import os
import pickle

import pytest

from ds_fastckpt import CheckpointIntegrityError, UnsafeCheckpointError
from tests.ds_helpers import assert_same_state, full_state, init_engine, train


class RunsCode:
    """Unpickling this calls os.mkdir(sentinel): the stand-in for an attacker's command."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.mkdir, (str(self.sentinel), ))


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
