"""Async checkpoints in flight at the end of a job (2 ranks under torchrun + gloo on CPU, and os.fork()).

destroy_process_group() commits the checkpoint in flight on every rank together; where it cannot (the group
is already gone), an uncaught exception and a forked child's exit leave it pending, promptly, and resume uses
the one before. Each job is run once per module, and first loads what the job before it left, in fresh engines.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_fastckpt.decisions.resume import choose_resume_tag
from ds_fastckpt.format.manifest import read_manifest
from ds_fastckpt.format.names import MANIFEST_NAME
from tests.ds_helpers import REPO

WORKER = Path(__file__).resolve().parent / "async_exit_worker.py"
JOB_TIMEOUT_S = 120  # the old code sat commit_timeout_s=300 s in the crashed rank's exit
RANK_FILES = {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def run_job(mode: str, out: Path, torchrun: bool = True) -> dict:
    """Runs one worker job; its exit code (None when it ran past JOB_TIMEOUT_S and was killed), time, output."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                     "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"]
    started = time.monotonic()
    job = subprocess.Popen(launcher + [str(WORKER), mode, str(out)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=JOB_TIMEOUT_S)
        code = job.returncode
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # torchrun and its ranks
        output, _ = job.communicate()
        code = None
    return {"code": code, "seconds": time.monotonic() - started, "output": output}


def complete_tags(save_dir: Path) -> list:
    return sorted(p.name for p in save_dir.iterdir() if (p / MANIFEST_NAME).is_file())


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("async_exit")


def run_and_resume(mode: str, out: Path) -> dict:
    """Runs a job; with what each rank resumed from the save_dirs of the job before (``LOADS`` in the worker)."""
    job = run_job(mode, out)
    reports = [out / f"{mode}_rank{rank}.json" for rank in range(2)]
    job["resumed"] = [json.loads(path.read_text()) if path.exists() else {} for path in reports]
    return job


@pytest.fixture(scope="module")
def crashed(out):
    return run_and_resume("crash", out)


@pytest.fixture(scope="module")
def destroyed(out, crashed):
    return run_and_resume("destroy", out)


@pytest.fixture(scope="module")
def bypassed(out, destroyed):
    return run_and_resume("bypass", out)


def assert_resumed(job: dict, case: str, tag: str) -> None:
    assert len(job["resumed"]) == 2 and all(job["resumed"]), job["output"][-6000:]
    for report in job["resumed"]:
        found = report[case]
        assert "error" not in found, found
        assert Path(found["load_path"]).parent.name == tag and found["global_steps"] == int(tag[-1])
        assert found["equal"]


@pytest.mark.parametrize("writers", ["all", "off"])
def test_destroy_process_group_commits_the_checkpoint_in_flight_on_every_rank(out, destroyed, bypassed, writers):
    assert destroyed["code"] == 0, destroyed["output"][-6000:]
    save_dir = out / f"destroy_{writers}"
    assert complete_tags(save_dir) == ["global_step1", "global_step2"], destroyed["output"][-6000:]
    assert (save_dir / "latest").read_text() == "global_step2"
    manifest = read_manifest(save_dir / "global_step2")
    assert manifest.world_size == 2 and manifest.step == 2
    assert {record.path for record in manifest.files} == RANK_FILES
    assert {record.rank for record in manifest.files} == {0, 1}
    assert_resumed(bypassed, f"destroy_{writers}", "global_step2")  # a fresh 2-rank job loads it


@pytest.mark.parametrize("writers", ["all", "off"])
def test_a_checkpoint_in_flight_when_the_group_is_already_gone_stays_pending(out, bypassed, writers):
    """destroy_process_group called through a reference taken before the hook: nothing is committed wrong."""
    assert bypassed["code"] == 0, bypassed["output"][-6000:]
    save_dir = out / f"bypass_{writers}"
    assert complete_tags(save_dir) == ["global_step1"], bypassed["output"][-6000:]
    assert (save_dir / ".global_step2.ds_fastckpt-tmp").is_dir()
    assert (save_dir / "latest").read_text() == "global_step1"
    warnings = [line for line in bypassed["output"].splitlines()
                if f"left checkpoint 'global_step2' in {save_dir} pending at exit" in line]
    assert len(warnings) == 2, bypassed["output"][-6000:]  # one per rank
    assert choose_resume_tag(save_dir)[0] == "global_step1"  # what load_checkpoint(save_dir) resumes from


def test_an_exception_exit_ends_the_job_promptly_and_leaves_the_checkpoint_pending(out, crashed, destroyed):
    assert crashed["code"] is not None, f"the job still ran after {JOB_TIMEOUT_S} s: " + crashed["output"][-6000:]
    assert crashed["code"] != 0 and crashed["seconds"] < JOB_TIMEOUT_S
    assert "rank 1 fails with global_step2 in flight" in crashed["output"]
    save_dir = out / "crash"
    assert complete_tags(save_dir) == ["global_step1"]
    assert (save_dir / ".global_step2.ds_fastckpt-tmp").is_dir()
    assert (save_dir / "latest").read_text() == "global_step1"
    warnings = [line for line in crashed["output"].splitlines() if "left checkpoint 'global_step2'" in line]
    # rank 1's, and rank 0's when its collective failed before torchrun stopped it
    assert 1 <= len(warnings) <= 2, crashed["output"][-6000:]
    assert all("uncaught exception" in line for line in warnings)
    assert_resumed(destroyed, "crash", "global_step1")  # a fresh 2-rank job loads the one before


def test_a_forked_child_leaves_the_parents_checkpoint_alone(tmp_path):
    """The child (sys.exit(0) right after os.fork()) exits at once; the parent commits its checkpoint itself."""
    job = run_job("fork", tmp_path, torchrun=False)
    assert job["code"] == 0, job["output"][-6000:]
    report = json.loads((tmp_path / "fork.json").read_text())
    # the writes had ended / were still running when the child was made
    for case, before in (("ended", []), ("running", ["global_step1"])):
        found = report[case]
        assert found.get("exit_code") == 0 and found["seconds"] < 30, (case, found)
        assert found["complete_after_child"] == before, (case, found)  # the child committed nothing
        assert found["step_error"] is None, (case, found)  # the parent's next step committed it
    assert report["complete"] == ["global_step1", "global_step2"]
    assert Path(report["load_path"]).parent.name == "global_step2" and report["equal"]
