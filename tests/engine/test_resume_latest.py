"""Resume means what DeepSpeed means: `load_checkpoint(dir)` takes the checkpoint `latest` names.

A save with ``save_latest=False`` (an evaluation snapshot, a "best" copy) is
not where training resumes, though it is the newest checkpoint by commit order.
"""

import logging
from pathlib import Path

import pytest

import ds_fastckpt
from ds_fastckpt import CheckpointIntegrityError
from tests.ds_helpers import assert_same_state, full_state, init_engine, torchrun_reports, train


def save_chosen_then_side(save_dir, async_save: bool) -> dict:
    """Saves "chosen" (written to `latest`), then "side" with save_latest=False; returns chosen's state."""
    engine = init_engine(1, {"keep_last": 0, "async": async_save}, seed=0)
    train(engine, 2)
    engine.save_checkpoint(save_dir, tag="chosen")
    chosen = full_state(engine)
    train(engine, 2)
    engine.save_checkpoint(save_dir, tag="side", save_latest=False)
    ds_fastckpt.wait(engine)
    engine.destroy()
    return chosen


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_with_save_latest_false_is_not_resumed(tmp_path, caplog, async_save):
    """Before: the job resumed from "side", the newest by commit order, silently."""
    chosen = save_chosen_then_side(tmp_path, async_save)
    assert (tmp_path / "latest").read_text() == "chosen"
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    loader = init_engine(1, {"keep_last": 0, "verify": "checksum"}, seed=9)
    load_path, _ = loader.load_checkpoint(tmp_path)
    assert Path(load_path).parent.name == "chosen"
    assert_same_state(chosen, full_state(loader))
    assert not [r for r in caplog.records if r.name.startswith("ds_fastckpt")]  # nothing to warn about
    loader.destroy()


@pytest.mark.parametrize("breakage", ["removed", "names-a-missing-tag", "names-a-damaged-checkpoint"])
def test_a_broken_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog, breakage):
    save_chosen_then_side(tmp_path, False)
    if breakage == "removed":
        (tmp_path / "latest").unlink()
        why = "'latest' is missing, empty or unreadable"
    elif breakage == "names-a-missing-tag":
        (tmp_path / "latest").write_text("global_step99")
        why = "'latest' names 'global_step99', which is not a complete checkpoint"
    else:
        model_states = tmp_path / "chosen" / "mp_rank_00_model_states.pt"
        model_states.write_bytes(model_states.read_bytes()[:100])
        why = "'latest' names 'chosen', which is damaged"
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    loader = init_engine(1, {"keep_last": 0, "verify": "checksum", "skip_damaged_on_resume": True}, seed=9)
    load_path, _ = loader.load_checkpoint(tmp_path)
    assert Path(load_path).parent.name == "side"
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("ds_fastckpt")]
    assert f"{why}; resuming from 'side', the newest complete checkpoint in {tmp_path}" in warnings
    loader.destroy()


def test_a_damaged_latest_stops_the_resume_without_skip_damaged_on_resume(tmp_path):
    save_chosen_then_side(tmp_path, False)
    model_states = tmp_path / "chosen" / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:100])
    loader = init_engine(1, {"keep_last": 0}, seed=9)
    with pytest.raises(CheckpointIntegrityError, match="mp_rank_00_model_states.pt.*skip_damaged_on_resume=true"):
        loader.load_checkpoint(tmp_path)
    loader.destroy()


def test_rotation_with_keep_last_1_never_deletes_what_latest_names(tmp_path):
    engine = init_engine(1, {"keep_last": 1}, seed=0)
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="chosen")
    chosen = full_state(engine)
    for index in range(3):
        train(engine, 1)
        engine.save_checkpoint(tmp_path, tag=f"side{index}", save_latest=False)
    engine.destroy()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")) == \
        ["chosen", "side2"]
    loader = init_engine(1, {"keep_last": 1}, seed=9)
    load_path, _ = loader.load_checkpoint(tmp_path)
    assert Path(load_path).parent.name == "chosen"
    assert_same_state(chosen, full_state(loader))
    loader.destroy()


def test_two_ranks_resume_what_latest_names_sync_and_async(tmp_path):
    reports = torchrun_reports(Path(__file__).resolve().parent / "resume_latest_worker.py", tmp_path, 2)
    for report in reports:
        for mode in ("sync", "async"):
            result = report[mode]
            assert Path(result["load_path"]).parent.name == "chosen", (report["rank"], mode, result)
            assert result["bit_exact"], (report["rank"], mode)
            assert {"chosen", "side", "latest"} <= set(result["dirs"]), result["dirs"]
