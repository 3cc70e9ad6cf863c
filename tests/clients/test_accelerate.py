"""accelerate as a client: ``save_state``/``load_state`` on 2 processes, DeepSpeed ZeRO-2 on CPU, async fast_aio saves.

Users launch with ``accelerate launch --use_deepspeed --num_processes 2``;
that wants a GPU-shaped config on this CPU-only host, so the jobs run under
torchrun with ``ACCELERATE_USE_DEEPSPEED=true``, which is what it sets (see
``accelerate_worker.py``). Two launches: ``first`` (a round trip, then a job
SIGKILLed on both ranks right after an async ``save_state()``) and ``resume``
(a new job loads what the killed one left).
"""

import json
import os
from pathlib import Path

import pytest

from tests.clients.plans import job, run_plan

WORKER = Path(__file__).resolve().parent / "accelerate_worker.py"
PROCESSES = 2


def run(plan: str, out: Path):
    return run_plan(WORKER, plan, out, PROCESSES)


def reports(plan: str, out: Path) -> list:
    return [json.loads((out / f"{plan}.rank{rank}.json").read_text()) for rank in range(PROCESSES)]


@pytest.fixture(scope="module")
def accelerate_jobs(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    first = run("first", out)
    after_kill = {"returncode": first.returncode, "output": first.stdout[-3000:] + first.stderr[-3000:],
                  "checkpoint_1": sorted(os.listdir(out / "killed" / "checkpoints" / "checkpoint_1"))}
    resumed = run("resume", out)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    return {"out": out, "first": reports("first", out), "after_kill": after_kill, "resume": reports("resume", out)}


def test_async_save_state_load_state_round_trip_is_bit_exact(accelerate_jobs):
    for report in accelerate_jobs["first"]:
        result = job(report, "round")
        assert result["folders"] == ["checkpoint_0", "checkpoint_1"]
        assert result["moved_after_save"] > 0  # training on changed the state, so the loads had work to do
        # load_state() picked checkpoint_1, load_state(checkpoint_0) the older one: params, fp32 partition, moments
        assert result["newest_differences"] == [] and result["oldest_differences"] == []


def test_load_state_after_a_kill_in_an_async_save_loads_the_last_complete_folder(accelerate_jobs):
    out, after_kill = accelerate_jobs["out"], accelerate_jobs["after_kill"]
    assert after_kill["returncode"] != 0 and "SIGKILL" in after_kill["output"], after_kill["output"]
    # accelerate's own files are all there; the DeepSpeed checkpoint is only pending.
    assert ".pytorch_model.ds_fastckpt-tmp" in after_kill["checkpoint_1"]
    assert "pytorch_model" not in after_kill["checkpoint_1"] and "random_states_0.pkl" in after_kill["checkpoint_1"]
    folder = out / "killed" / "checkpoints" / "checkpoint_1"
    complete = out / "killed" / "checkpoints" / "checkpoint_0"
    for report in accelerate_jobs["resume"]:
        result = job(report, "killed")
        # load_state() with automatic_checkpoint_naming passes over checkpoint_1 and resumes step 2 bit for bit.
        assert result["automatic"] == {"differences": []}, result["automatic"]
        # Naming the pending folder says what is pending and what to load instead.
        explicit = result["explicit"]
        assert explicit["type"] == "PendingCheckpointError" and explicit["is_pending_error"], explicit
        assert explicit["is_file_not_found"]
        assert explicit["attributes"] == {"folder": str(folder), "tag": "pytorch_model",
                                          "pending_dir": str(folder / ".pytorch_model.ds_fastckpt-tmp"),
                                          "instead": str(complete)}
        message = explicit["message"]
        assert f"checkpoint 'pytorch_model' in {folder} was never committed" in message
        assert "still in flight when the process that saved it ended" in message
        assert f"accelerator.load_state({str(complete)!r})" in message
        # DeepSpeed's own load_checkpoint of that tag: the same error type, not a bare AssertionError.
        engine_explicit = result["engine_explicit"]
        assert engine_explicit["type"] == "PendingCheckpointError", engine_explicit
        assert f"checkpoint 'pytorch_model' in {folder} was never committed" in engine_explicit["message"]
        assert f"{folder} holds no complete checkpoint" in engine_explicit["message"]
