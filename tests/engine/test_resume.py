"""load_checkpoint(dir) resumes from what `latest` names when it is complete, else from the newest complete one."""

import logging
import os

import pytest

from ds_fastckpt import CheckpointIntegrityError
from tests.ds_helpers import assert_same_state, full_state, init_engine, train


@pytest.fixture
def two_checkpoints(tmp_path):
    engine = init_engine(1, {"keep_last": 0})
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    return tmp_path, full_state(engine)


def resume(save_dir, **fast_aio):
    engine = init_engine(1, {"keep_last": 0, **fast_aio}, seed=9)
    path, _ = engine.load_checkpoint(save_dir)
    return engine, path


@pytest.mark.parametrize("latest", [None, "", "global_step7", "garbage\n"])
def test_a_broken_latest_resumes_from_newest_complete(two_checkpoints, caplog, latest):
    save_dir, newest_state = two_checkpoints
    if latest is None:
        (save_dir / "latest").unlink()
    else:
        (save_dir / "latest").write_text(latest)
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    engine, path = resume(save_dir)
    assert "global_step2" in path
    assert_same_state(newest_state, full_state(engine))
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("ds_fastckpt")]
    assert len(warnings) == 1 and "resuming from 'global_step2'" in warnings[0]


def test_latest_naming_an_older_tag_without_manifest_is_not_loaded(two_checkpoints, caplog):
    save_dir, newest_state = two_checkpoints
    partial = save_dir / "global_step3"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    os.utime(partial, ns=(1, 1))  # written before our newest checkpoint was committed
    (save_dir / "latest").write_text("global_step3")
    engine, path = resume(save_dir)
    assert "global_step2" in path
    assert_same_state(newest_state, full_state(engine))


def test_no_checkpoint_returns_none(tmp_path):
    engine = init_engine(1, {"keep_last": 0})
    assert engine.load_checkpoint(tmp_path) == (None, None)


@pytest.mark.parametrize("verify", ["size", "checksum"])
def test_truncated_file_is_named(two_checkpoints, verify):
    save_dir, _ = two_checkpoints
    victim = save_dir / "global_step2" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointIntegrityError, match="mp_rank_00_model_states.pt has .* bytes; the manifest says"):
        resume(save_dir, verify=verify)


def test_flipped_bit_is_caught_by_checksum(two_checkpoints):
    save_dir, _ = two_checkpoints
    victim = save_dir / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt has CRC-32C"):
        resume(save_dir, verify="checksum")


def test_missing_file_is_named(two_checkpoints):
    save_dir, _ = two_checkpoints
    (save_dir / "global_step2" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointIntegrityError, match="mp_rank_00_model_states.pt is missing"):
        resume(save_dir)


def test_a_run_switched_from_the_default_engine_resumes_and_keeps_its_checkpoints(tmp_path, caplog):
    default = init_engine(1, engine=None)
    train(default, 1)
    default.save_checkpoint(tmp_path)
    train(default, 1)
    default.save_checkpoint(tmp_path)
    default_state = full_state(default)
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    switched, path = resume(tmp_path, keep_last=1)
    assert "global_step2" in path
    assert_same_state(default_state, full_state(switched))
    [warning] = [r.getMessage() for r in caplog.records if r.name.startswith("ds_fastckpt")]
    assert "written by another checkpoint engine" in warning and "no checksums" in warning
    for _ in range(3):
        train(switched, 1)
        switched.save_checkpoint(tmp_path)
    ours = full_state(switched)
    # keep_last=1 rotates our own checkpoints only: the default engine's stay.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [".global_step4.ds_fastckpt-spare",
                                                                        "global_step1", "global_step2",
                                                                        "global_step5"]
    again, path = resume(tmp_path)
    assert "global_step5" in path
    assert_same_state(ours, full_state(again))


def test_a_default_engine_save_after_ours_is_the_newer_one(tmp_path):
    ours = init_engine(1, {"keep_last": 0})
    train(ours, 1)
    ours.save_checkpoint(tmp_path)
    ours.destroy()
    default = init_engine(1, engine=None, seed=3)
    train(default, 2)
    default.save_checkpoint(tmp_path)
    engine, path = resume(tmp_path)
    assert "global_step2" in path
    assert_same_state(full_state(default), full_state(engine))
