"""Save patterns of clients we did not write: a new save_dir per checkpoint, a save_dir above earlier ones,
DeepSpeed's save_16bit_model, universal checkpoints' latest_universal, a load while an async save is in flight."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from ds_fastckpt import FdLeakError, open_fds_under, wait
from ds_fastckpt.format.names import LOCK_NAME, MANIFEST_NAME
from tests.ds_helpers import assert_same_state, deepspeed_scripts, full_state, init_engine, train


def save_like_hf_trainer(engine, output_dir, saves: int, keep: int = 2):
    """Each checkpoint into output_dir/checkpoint-N, the oldest deleted by the client after each save."""
    for _ in range(saves):
        train(engine, 1)
        engine.save_checkpoint(output_dir / f"checkpoint-{engine.global_steps}")
        for old in sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_new_save_dir_per_checkpoint_holds_one_descriptor(tmp_path, async_save):
    engine = init_engine(1, {"keep_last": 0, "async": async_save})
    save_like_hf_trainer(engine, tmp_path, saves=12)
    wait(engine)  # the async write of the last checkpoint holds its file open until it is done
    held = open_fds_under(tmp_path)
    newest = tmp_path / f"checkpoint-{engine.global_steps}"
    assert [(entry.target, entry.deleted) for entry in held] == [(str(newest / LOCK_NAME), False)]
    engine.destroy()
    assert open_fds_under(tmp_path) == []


def test_a_descriptor_to_a_deleted_file_of_an_earlier_save_dir_is_caught(tmp_path):
    engine = init_engine(1, {"keep_last": 0, "fd_audit": "raise"})
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "checkpoint-1")
    leaked = os.open(tmp_path / "checkpoint-1" / "global_step1" / "mp_rank_00_model_states.pt", os.O_RDONLY)
    try:
        shutil.rmtree(tmp_path / "checkpoint-1")
        train(engine, 1)
        with pytest.raises(FdLeakError) as raised:
            engine.save_checkpoint(tmp_path / "checkpoint-2")
        assert (f"fd {leaked} -> {tmp_path}/checkpoint-1/global_step1/mp_rank_00_model_states.pt (deleted)"
                in str(raised.value))
        assert (tmp_path / "checkpoint-2" / "global_step2" / MANIFEST_NAME).is_file()  # committed all the same
    finally:
        os.close(leaked)


def test_a_save_into_the_directory_above_earlier_save_dirs(tmp_path):
    """HF's save_model() with ZeRO-3 saves a checkpoint into output_dir, above its checkpoint-N dirs."""
    engine = init_engine(3, {"keep_last": 1, "fd_audit": "raise"})
    save_like_hf_trainer(engine, tmp_path, saves=2)
    engine.save_checkpoint(tmp_path)
    assert (tmp_path / "global_step2" / MANIFEST_NAME).is_file()
    assert [entry.target for entry in open_fds_under(tmp_path)] == [str(tmp_path / LOCK_NAME)]
    save_like_hf_trainer(engine, tmp_path, saves=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        LOCK_NAME, "checkpoint-2", "checkpoint-3", "global_step2", "latest", *deepspeed_scripts()]


@pytest.mark.parametrize("async_save", [False, True])
def test_save_16bit_model_writes_its_file_and_leaves_the_checkpoint_alone(tmp_path, async_save):
    engine = init_engine(1, {"keep_last": 1, "async": async_save})
    train(engine, 2)
    engine.save_checkpoint(tmp_path)
    saved = full_state(engine)
    before = {path.relative_to(tmp_path): path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert engine.save_16bit_model(str(tmp_path))
    engine.destroy()  # commits the async checkpoint, if it was still in flight
    weights = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert weights.keys() == dict(engine.module.named_parameters()).keys()
    for name, param in engine.module.named_parameters():
        assert torch.equal(weights[name], param.detach())
    after = {path.relative_to(tmp_path): path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    del after[Path("pytorch_model.bin")]
    if async_save:  # the checkpoint was in flight during the 16-bit save, and was committed after it
        committed = {path.name for path in after if path.parts[0] == "global_step2"}
        assert committed == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", MANIFEST_NAME}
    else:
        assert after == before
    assert (tmp_path / "latest").read_text() == "global_step2"
    resumed = init_engine(1, {"keep_last": 1}, seed=5)
    path, _ = resumed.load_checkpoint(tmp_path)
    assert "global_step2" in path
    assert_same_state(saved, full_state(resumed))


def test_a_load_commits_the_async_checkpoint_in_flight_first(tmp_path):
    engine = init_engine(1, {"keep_last": 0, "async": True})
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    saved = full_state(engine)
    assert not (tmp_path / "global_step1").exists()  # still in flight: commits at the next step
    path, _ = engine.load_checkpoint(tmp_path, tag="global_step1")
    assert "global_step1" in path and (tmp_path / "global_step1" / MANIFEST_NAME).is_file()
    assert_same_state(saved, full_state(engine))
    engine.destroy()
