"""``parallel_writers`` on 2 ranks (torchrun, gloo on CPU, ZeRO-1): by default both ranks write the
model-states file together, byte for byte what torch.save writes (ranks agree on torch's layout), with the balance of bytes written read from
/proc/self/io; "off" is the control."""

from pathlib import Path

import pytest

from tests.ds_helpers import torchrun_reports

MODEL_STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_writers")
    return torchrun_reports(Path(__file__).resolve().parent / "parallel_worker.py", out, 2), out


def balance(reports, mode: str, save: int) -> float:
    written = [report[mode]["written"][save] for report in reports]
    return min(written) / max(written)


@pytest.mark.parametrize("mode", ["default", "all_async"])
def test_both_ranks_write_a_balanced_share(reports, mode):
    for save in range(3):
        assert balance(reports[0], mode, save) >= 0.8, [report[mode]["written"] for report in reports[0]]
    assert all(report[mode]["writes_in_parallel"] for report in reports[0])


def test_one_writer_is_unbalanced_in_the_same_run(reports):
    """The control: without parallel writers rank 0 writes the model states alone."""
    assert not any(report["off"]["writes_in_parallel"] for report in reports[0])
    for save in range(3):
        assert balance(reports[0], "off", save) < 0.7


@pytest.mark.parametrize("mode", ["off", "default", "all_async"])
def test_the_file_is_what_one_writer_writes_and_its_record_matches(reports, mode):
    rank0 = reports[0][0][mode]
    # (byte for byte, same records) against torch.save of the same state, in the same process. One writer alone pads
    # each storage's record to its own memory; writers sharing a file keep torch's layout, which every rank knows.
    assert [same for _, same in rank0["identical"]] == [True, True, True]
    if mode != "off":
        assert [identical for identical, _ in rank0["identical"]] == [True, True, True]
    assert rank0["record"]["bytes"] == rank0["size"] > 2_000_000
    assert rank0["record"]["crc32c"] == rank0["crc32c"]  # joined from both ranks' runs, nothing read back
    assert rank0["record"]["rank"] == 0


@pytest.mark.parametrize("mode", ["off", "default", "all_async"])
def test_resume_is_bit_exact_on_both_ranks_and_the_spare_was_written_over(reports, mode):
    for report in reports[0]:
        assert report[mode]["resumed_exactly"], report["rank"]
        assert Path(report[mode]["load_path"]).parent.name == "global_step3"
        assert report[mode]["recycled"], report["rank"]


def test_a_failing_share_fails_the_save_on_every_rank(reports):
    rank0, rank1 = (report["failing_share"] for report in reports[0])
    assert rank1["raised"]["type"] == "OSError" and rank1["raised"]["errno"] == 5
    assert f".global_step2.ds_fastckpt-tmp/{MODEL_STATES}" in rank1["raised"]["message"]
    assert rank0["raised"]["type"] == "CommitError"
    assert "checkpoint 'global_step2' was not committed: rank 1: OSError: [Errno 5]" in rank0["raised"]["message"]
    for result in (rank0, rank1):
        assert result["latest_after_failure"] == "global_step1"
        assert result["latest_after_next"] == "global_step3"
    assert rank0["dirs"] == ["global_step1", "global_step3"]
