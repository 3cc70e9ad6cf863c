"""The engine on 2 ranks (torchrun, gloo on CPU): round trips for ZeRO 0-3, rotation, fd audit, resume."""

import json
from pathlib import Path

import pytest

from tests.ds_helpers import torchrun_reports


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    return torchrun_reports(Path(__file__).resolve().parent / "two_rank_worker.py", out, 2), out


@pytest.mark.parametrize("mode", ["round_trips", "async_round_trips"])
@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_round_trip_is_bit_exact_on_every_rank(reports, stage, mode):
    for report in reports[0]:
        trip = report[mode][stage]
        assert trip["differed_before"] and trip["equal_after"], (report["rank"], trip)
        assert "global_step3" in trip["load_path"]


def test_rotation_on_two_ranks(reports):
    rank0, rank1 = reports[0]
    assert rank0["rotation"]["dirs"] == [".global_step48.ds_fastckpt-spare", "global_step20", "global_step40",
                                         "global_step49", "global_step50"]
    assert rank0["rotation"]["unrelated"] == "mine"
    assert rank0["rotation"]["latest"] == "global_step50"
    newest = rank0["rotation"]["files_in_newest"]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in newest
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in newest
    # Each rank wrote its files over those of the spare: rank 1 found it by name too.
    assert rank0["rotation"]["recycled"] == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                             "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_no_fd_into_save_dir_on_any_rank_after_fifty_cycles(reports):
    rank0, rank1 = reports[0]
    assert rank0["rotation"]["open_fds"] == [str(reports[1] / "rotation" / ".ds_fastckpt.lock")]  # the lock
    assert rank1["rotation"]["open_fds"] == []
    assert rank0["rotation"]["deleted_fds_seen"] == 0 and rank1["rotation"]["deleted_fds_seen"] == 0


def test_resume_without_latest_on_both_ranks(reports):
    for report in reports[0]:
        assert "global_step50" in report["resume"]["load_path"]
        assert report["resume"]["global_steps"] == 50


def test_manifest_lists_both_ranks_files(reports):
    manifest = json.loads((reports[1] / "rotation" / "global_step50" / "ds_fastckpt_manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {record["rank"] for record in manifest["files"]} == {0, 1}


@pytest.mark.parametrize("case", ["empty", "incomplete"])
def test_resume_with_broken_latest_on_both_ranks(reports, case):
    for report in reports[0]:
        assert "global_step50" in report["broken_latest"][case]["load_path"]
        assert report["broken_latest"][case]["global_steps"] == 50


def test_resume_takes_the_older_complete_checkpoint_latest_names_on_both_ranks(reports):
    for report in reports[0]:  # as DeepSpeed does: `latest` is where the job said to resume
        assert "global_step20" in report["broken_latest"]["older"]["load_path"]
        assert report["broken_latest"]["older"]["global_steps"] == 20


def test_keep_last_one_keeps_what_latest_names_on_two_ranks(reports):
    result = reports[0][0]["keep_last_one"]
    assert result["after_second"] == ["first", "second"]
    assert result["after_third"] == [".second.ds_fastckpt-spare", "third"]


def test_injected_leak_is_caught_on_every_rank(reports):
    for report in reports[0]:
        leak = report["injected_leak"]
        assert leak["leaked"] >= 1
        assert leak["message"] and "file descriptors still open into" in leak["message"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failing_write_on_one_rank_fails_the_save_on_every_rank(reports, mode):
    rank0, rank1 = (report["failing_write"][mode] for report in reports[0])
    assert rank1["raised"]["type"] == "OSError" and rank1["raised"]["errno"] == 5
    assert ".global_step2.ds_fastckpt-tmp/zero_pp_rank_1_mp_rank_00_optim_states.pt" in rank1["raised"]["message"]
    assert rank0["raised"]["type"] == "CommitError"
    assert "checkpoint 'global_step2' was not committed: rank 1: OSError: [Errno 5]" in rank0["raised"]["message"]
    for result in (rank0, rank1):
        assert result["latest_after_failure"] == "global_step1"
    # Training went on and the next save committed (an async failure surfaces in engine.step(), which raised).
    assert rank0["latest_after_next"] == rank1["latest_after_next"] == "global_step3"
    assert rank0["dirs"] == ["global_step1", "global_step3"]


def test_both_ranks_skip_a_checkpoint_damaged_in_one_ranks_file(reports):
    for report in reports[0]:
        assert "global_step1" in report["skip_damaged"]["load_path"] and report["skip_damaged"]["same_state"]
