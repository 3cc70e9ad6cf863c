"""``parallel_writers`` on 2 ranks (torchrun, gloo on CPU, ZeRO-1) where the ranks do not hold the same bytes:
the shared model-states file is still byte for byte what the leader alone writes; and a save whose
``client_state`` cannot be pickled fails at once on every rank, as with ``"parallel_writers": "off"``."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ds_helpers import REPO

WORKER = Path(__file__).resolve().parent / "share_worker.py"
COMMIT_TIMEOUT_S = 300  # what the unpicklable case sets: a rank left waiting would wait this long


def two_ranks(out: Path, case: str, timeout_s: int) -> list:
    """Each rank's report of ``share_worker.py OUT case``; the test fails (it does not hang) past ``timeout_s``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(WORKER), str(out), case]
    # A session of its own, so that a job past its time is ended with its ranks, not just torchrun.
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"the 2-rank job did not end within {timeout_s} s: {stderr[-3000:]}")
    assert job.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def differing(tmp_path_factory):
    return two_ranks(tmp_path_factory.mktemp("share_differing"), "differing", 600)


@pytest.fixture(scope="module")
def unpicklable(tmp_path_factory):
    # Far below commit_timeout_s: a rank waiting for the others would make the job outlast it.
    return two_ranks(tmp_path_factory.mktemp("share_unpicklable"), "unpicklable", COMMIT_TIMEOUT_S - 60)


@pytest.mark.parametrize("what", ["extra_state", "sharded_frozen", "diverged_frozen"])
def test_a_tensor_that_differs_between_ranks_is_saved_as_the_leader_holds_it(differing, what):
    rank0, rank1 = (report[what] for report in differing)
    assert rank0["writes_in_parallel"] and rank1["writes_in_parallel"]
    # What torch.load returns is rank 0's tensor, on both ranks' reading, not a splice with rank 1's.
    for report in (rank0, rank1):
        assert report["saved_tail_is_rank0s"], (report["saved_tail_differs_from_rank0s_at"], what)
    assert rank0["identical_to_leader_alone"]  # byte for byte torch.save of rank 0's state
    assert rank0["record_crc_is_the_file_s"]
    # A resume (verify: checksum) gives both ranks rank 0's tensor, and the shared parameters as saved.
    for report in (rank0, rank1):
        assert Path(report["load_path"]).parent.name == "global_step1"
        assert report["loaded_tail_is_rank0s"] and report["loaded_body_is_the_saved"]


def test_an_unpicklable_client_state_fails_at_once_on_every_rank_as_with_one_writer(unpicklable):
    rank0, rank1 = (report["default"] for report in unpicklable)
    control0, control1 = (report["off"] for report in unpicklable)
    assert rank0["writes_in_parallel"] and not control0["writes_in_parallel"]
    # Rank 0 raises the pickling error itself, the other rank a CommitError naming it: as with one writer.
    assert rank0["raised"] == control0["raised"]
    assert rank0["raised"]["type"] in ("AttributeError", "PicklingError", "TypeError")
    assert "pickle" in rank0["raised"]["message"]
    assert rank1["raised"] == control1["raised"]
    assert (rank1["raised"]["module"], rank1["raised"]["type"]) == ("ds_fastckpt.engine.rank_group", "CommitError")
    assert rank1["raised"]["message"] == (f"checkpoint 'global_step2' was not committed: rank 0: "
                                          f"{rank0['raised']['type']}: {rank0['raised']['message']}")
    for report in (rank0, rank1):
        assert report["seconds"] < 60, report["seconds"]  # no rank waited for another (commit_timeout_s 300)
        assert report["latest_after_failure"] == "global_step1"
        assert report["latest_after_next"] == "global_step3"
        assert report["dirs"] == ["global_step1", "global_step3"]
