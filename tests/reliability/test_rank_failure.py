"""Rank 1 of 2 dies or hangs in the middle of a save: rank 0 gets a clear error instead of waiting forever,
nothing is committed, and the next job resumes from the last complete checkpoint."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ds_fastckpt.format.records import complete_checkpoints, scan
from tests.ds_helpers import free_port

WORKER = Path(__file__).resolve().parent / "rank_failure_worker.py"
REPO = Path(__file__).resolve().parents[2]


def start_ranks(save_dir: Path, out: Path, mode: str):
    port = str(free_port())
    ranks = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        ranks.append(subprocess.Popen([sys.executable, str(WORKER), str(save_dir), str(out), mode], env=env,
                                      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True))
    return ranks


def finish(process, timeout: float) -> str:
    """Waits for a rank; one still running at the deadline is a hang, and fails the test."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"rank did not finish within {timeout} s:\n{stderr.decode()[-3000:]}")
    return stderr.decode()[-3000:]


@pytest.mark.parametrize("mode", ["kill", "stop"])
def test_a_lost_rank_fails_the_save_on_the_other_and_the_next_job_resumes(tmp_path, mode):
    save_dir, out = tmp_path / "ckpts", tmp_path / "out"
    out.mkdir()
    rank0, rank1 = start_ranks(save_dir, out, mode)
    try:
        stderr = finish(rank0, timeout=300)
    finally:
        os.killpg(rank1.pid, signal.SIGKILL)
        rank1.communicate()
    assert (out / "rank0.json").exists(), stderr
    report = json.loads((out / "rank0.json").read_text())
    assert report["raised"] is not None, "rank 0's save returned although rank 1 never finished its part"
    assert report["raised"]["type"] == "CommitError"
    assert "checkpoint 'global_step2' was not committed" in report["raised"]["message"]
    assert "commit_timeout_s=15" in report["raised"]["message"]
    assert (save_dir / "latest").read_text() == "global_step1"
    assert [record.tag for record in complete_checkpoints(scan(save_dir))] == ["global_step1"]

    ranks = start_ranks(save_dir, out, "resume")
    for rank, process in enumerate(ranks):
        stderr = finish(process, timeout=300)
        assert process.returncode == 0, stderr
        resumed = json.loads((out / f"resume_rank{rank}.json").read_text())
        assert Path(resumed["load_path"]).parent.name == "global_step1" and resumed["same_state"], (rank, resumed)
    assert [record.tag for record in complete_checkpoints(scan(save_dir))] == ["global_step1", "global_step2"]
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir()) == ["global_step1", "global_step2"]
