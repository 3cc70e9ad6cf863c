"""The Hugging Face Trainer with ``replicate``, on 2 processes: both tiers rotate, and after output_dir is deleted
``resume_from_checkpoint=True`` resumes from the remote tier, bit-exactly, Trainer state included."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.clients.plans import job, run_plan

WORKER = Path(__file__).resolve().parents[1] / "clients" / "hf_worker.py"


def reports(plan: str, out: Path) -> list:
    result = run_plan(WORKER, plan, out, 2, drop_env=("ACCELERATE_USE_DEEPSPEED",))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((out / f"{plan}.rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture
def runs(tmp_path, s3_url, monkeypatch):
    monkeypatch.setenv("HF_REPLICATE_URL", s3_url)
    first = reports("two_replicate_first", tmp_path)
    local_before = sorted(path.name for path in (tmp_path / "two_replicated").iterdir())
    shutil.rmtree(tmp_path / "two_replicated")  # the node, and output_dir with it, is gone
    return {"out": tmp_path, "first": first, "local_before": local_before,
            "resume": reports("two_replicate_resume", tmp_path)}


def test_both_tiers_rotate_and_a_deleted_output_dir_resumes_from_the_remote_tier(runs):
    saved = job(runs["first"][0], "two_replicated")
    # The Trainer keeps 2 checkpoint-N locally (save_total_limit), the remote tier its own keep_last 2.
    assert [name for name in runs["local_before"] if name.startswith("checkpoint-")] == ["checkpoint-4",
                                                                                       "checkpoint-6"]
    assert sorted(saved["remote"]) == ["global_step4", "global_step6"] and saved["remote_latest"] == "global_step6"
    # Each remote checkpoint carries the Trainer's own files of its checkpoint-N: state, and both ranks' RNG.
    for files in saved["remote"].values():
        assert {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= set(files), files

    for rank in range(2):
        resumed = job(runs["resume"][rank], "two_replicated")
        assert resumed["started_at_step"] == 6, resumed  # trainer_state.json came back with the checkpoint
        assert resumed["global_step"] == 8
    resumed = job(runs["resume"][0], "two_replicated")
    assert [name for name in resumed["dirs"] if name.startswith("checkpoint-")] == ["checkpoint-6", "checkpoint-8"]
    assert sorted(resumed["remote"]) == ["global_step6", "global_step8"] and resumed["remote_latest"] == "global_step8"
    reference = torch.load(runs["out"] / "two_ref_z2.params.pt", weights_only=True)
    final = torch.load(runs["out"] / "two_replicated.params.pt", weights_only=True)
    assert sorted(reference) == sorted(final)
    for name, value in reference.items():
        assert torch.equal(value, final[name]), name
