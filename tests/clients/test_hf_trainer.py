"""The Hugging Face Trainer as a client: DeepSpeed ZeRO-2/3 on CPU, saving through fast_aio.

Every job runs under torchrun in ``hf_worker.py`` (a tiny GPT-2, synthetic
tokens, ``save_steps=2``, ``save_total_limit=2``); the worker reports what it
saw as JSON and leaves its output_dirs for these tests to read. Plans, in order:
``first`` (1 process: uninterrupted references, 4-step runs to resume,
``save_model``, ``load_best_model_at_end``, 40 saves of descriptors,
``save_16bit_model``), ``kill`` (an async job SIGKILLed right after a save),
``resume`` (a fresh process resumes them all with ``resume_from_checkpoint=True``,
after naming the killed job's pending checkpoint-4 once), then ``two_first`` and
``two_resume`` (the same resume and ``save_model`` on 2 processes, ZeRO-3).
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.integrations import last_complete_checkpoint
from tests.clients.plans import REPO, job, run_plan

WORKER = Path(__file__).resolve().parent / "hf_worker.py"


def reports(plan: str, out: Path, processes: int) -> list:
    result = run_plan(WORKER, plan, out, processes, drop_env=("ACCELERATE_USE_DEEPSPEED",))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((out / f"{plan}.rank{rank}.json").read_text()) for rank in range(processes)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The three 1-process plans; what the killed job left is recorded before the resume rewrites it."""
    out = tmp_path_factory.mktemp("hf_one")
    first = reports("first", out, 1)[0]
    migrate_checkpoint_4 = sorted(os.listdir(out / "migrate" / "checkpoint-4" / "global_step4"))
    killed = run_plan(WORKER, "kill", out, 1, drop_env=("ACCELERATE_USE_DEEPSPEED",))
    after_kill = {
        "returncode": killed.returncode,
        "output": killed.stdout[-3000:] + killed.stderr[-3000:],
        "checkpoint_4": sorted(os.listdir(out / "killed" / "checkpoint-4")),
        "last_complete_checkpoint": last_complete_checkpoint(out / "killed"),
    }
    resumed = reports("resume", out, 1)[0]
    return {"out": out, "first": first, "after_kill": after_kill, "resume": resumed,
            "migrate_checkpoint_4": migrate_checkpoint_4}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_two")
    return {"out": out, "first": reports("two_first", out, 2), "resume": reports("two_resume", out, 2)}


def flatten(obj, prefix=""):
    """(path, value) of every tensor and number in a loaded checkpoint file."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key != "ds_config":  # the config names the checkpoint engine, which differs after a migration
                yield from flatten(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from flatten(value, f"{prefix}/{index}")
    elif isinstance(obj, (bool, int, float)) or obj is None:
        yield prefix, obj


def checkpoint_differences(tag_dir: Path, reference_dir: Path) -> list:
    """What differs between the DeepSpeed files of two tag dirs, loaded with torch.load."""
    names = sorted(path.name for path in tag_dir.glob("*.pt"))
    assert names and names == sorted(path.name for path in reference_dir.glob("*.pt")), (names, reference_dir)
    differences = []
    for name in names:
        got = dict(flatten(torch.load(tag_dir / name, map_location="cpu", weights_only=False)))
        want = dict(flatten(torch.load(reference_dir / name, map_location="cpu", weights_only=False)))
        if sorted(got) != sorted(want):
            differences.append(f"{name}: keys {sorted(set(got) ^ set(want))}")
            continue
        for key, value in want.items():
            equal = (torch.equal(got[key], value) and got[key].dtype == value.dtype) if torch.is_tensor(value) \
                else got[key] == value
            if not equal:
                differences.append(f"{name}{key}")
    return differences


def assert_params_equal(out: Path, job_name: str, reference: str) -> None:
    got = torch.load(out / f"{job_name}.params.pt", weights_only=True)
    want = torch.load(out / f"{reference}.params.pt", weights_only=True)
    assert sorted(got) == sorted(want)
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert different == [], f"{job_name} differs from {reference} in {different}"


def assert_same_final_state(out: Path, job_name: str, reference: str) -> None:
    """Final parameters (gathered) and the step-8 DeepSpeed checkpoint, module and optimizer, are bit-exact."""
    assert_params_equal(out, job_name, reference)
    tag_dir = out / job_name / "checkpoint-8" / "global_step8"
    assert (tag_dir / MANIFEST_NAME).is_file()
    assert checkpoint_differences(tag_dir, out / reference / "checkpoint-8" / "global_step8") == []


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_after_four_steps_is_bit_exact(one_process, stage):
    out, first, resumed = one_process["out"], one_process["first"], one_process["resume"]
    assert job(first, f"part_z{stage}")["dirs"][-2:] == ["checkpoint-2", "checkpoint-4"]
    result = job(resumed, f"part_z{stage}")
    assert result["resumed_from"] == "True" and result["global_step"] == 8
    assert job(first, f"ref_z{stage}")["global_step"] == 8
    assert_same_final_state(out, f"part_z{stage}", f"ref_z{stage}")


def test_resume_on_two_processes_zero3_is_bit_exact(two_processes):
    out = two_processes["out"]
    for report in two_processes["resume"]:
        result = job(report, "two_part_z3")
        assert result["resumed_from"] == "True" and result["global_step"] == 8
    files = sorted(path.name for path in (out / "two_part_z3" / "checkpoint-8" / "global_step8").glob("*.pt"))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in files  # each rank wrote its own partition
    assert_same_final_state(out, "two_part_z3", "two_ref_z3")


def test_descriptors_stay_bounded_over_forty_saves(one_process):
    fast = job(one_process["first"], "fds_fast_aio")
    default = job(one_process["first"], "fds_default")
    print(f"\ndescriptors into output_dir after each of 40 Trainer saves: fast_aio max {fast['max_fds']} "
          f"(lock {fast['max_locks']}), deleted {fast['deleted_fds_seen']}; DeepSpeed's default engine max "
          f"{default['max_fds']}, deleted {default['deleted_fds_seen']}")
    assert fast["saves"] == default["saves"] == 40
    assert fast["max_fds"] <= 1 and fast["max_locks"] <= 1 and fast["deleted_fds_seen"] == 0
    for sample in fast["samples"]:  # the one descriptor is the lock of the newest checkpoint-N
        assert all(target.endswith("/.ds_fastckpt.lock") for target in sample), sample
    assert fast["checkpoint_dirs"] == ["checkpoint-39", "checkpoint-40"]  # save_total_limit=2 rotated the rest


@pytest.mark.parametrize("processes", [1, 2])
def test_save_model_under_zero3_saves_a_checkpoint_beside_checkpoint_dirs(one_process, two_processes, processes):
    out, first = (one_process["out"], [one_process["first"]]) if processes == 1 else \
        (two_processes["out"], two_processes["first"])
    name = "part_z3" if processes == 1 else "two_part_z3"
    for report in first:
        result = job(report, name)
        assert result["save_model"] == "ok"
        assert {"checkpoint-2", "checkpoint-4", "global_step4", "latest"} <= set(result["dirs_after_save_model"])
        assert result["resume_tag_of_output_dir"] == "global_step4"
        # Only the storage leader holds a descriptor there afterwards: output_dir's own lock.
        assert result["fds_after_save_model"] == ([str(out / name / ".ds_fastckpt.lock")] if report["rank"] == 0
                                                  else []), result["fds_after_save_model"]
    assert (out / name / "global_step4" / MANIFEST_NAME).is_file()
    assert (out / name / "latest").read_text().strip() == "global_step4"
    # The checkpoint-N dirs were left as they were: the resume from checkpoint-4 was bit-exact above.


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_load_best_model_at_end_loads_the_last_checkpoint(one_process, mode):
    """No FastAioTrainerCallback passed: importing ds_fastckpt wires it in, first after the Trainer's own."""
    out = one_process["out"]
    name = f"best_{mode}"
    result = job(one_process["first"], name)
    assert result["callbacks"][:3] == ["DefaultFlowCallback", "FastAioTrainerCallback", "PerturbAfterLastSave"]
    assert result["callbacks"].count("FastAioTrainerCallback") == 1
    losses = result["eval_losses"]
    assert len(losses) == 4 and all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert result["best_model_checkpoint"] == "checkpoint-8" and result["global_step"] == 8
    tag_dir = out / name / "checkpoint-8" / "global_step8"
    assert (tag_dir / MANIFEST_NAME).is_file()
    assert not [entry for entry in os.listdir(out / name / "checkpoint-8") if entry.endswith(".ds_fastckpt-tmp")]
    # The worker moved every weight by +1 after the last save: loading the best model put them back.
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    final = torch.load(out / f"{name}.params.pt", weights_only=True)
    assert [key for key in final if not torch.equal(final[key], saved[key])] == []


def test_save_16bit_model_into_a_checkpoint_dir_keeps_the_checkpoint(one_process):
    result = job(one_process["first"], "fds_fast_aio")["save_16bit_model"]
    assert "error" not in result and "load_error" not in result, json.dumps(result, indent=1)
    assert result["step"] == 40 and result["returned"] is True
    assert result["weights_file"] == "pytorch_model.bin" and result["weights_equal_module"]
    assert {"global_step40", "latest", "pytorch_model.bin"} <= set(result["dirs"])
    assert result["resume_tag"] == "global_step40"
    assert result["load_path"].endswith("checkpoint-40/global_step40/mp_rank_00_model_states.pt")
    assert result["global_steps_after_load"] == 40 and result["state_equal_after_load"]
    checkpoint_dir = one_process["out"] / "fds_fast_aio" / "checkpoint-40"
    weights = torch.load(checkpoint_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    saved = torch.load(checkpoint_dir / "global_step40" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    assert sorted(weights) == sorted(saved) and all(torch.equal(weights[key], saved[key]) for key in saved)


def test_killed_async_job_resumes_from_the_last_complete_checkpoint(one_process):
    out, after_kill = one_process["out"], one_process["after_kill"]
    assert after_kill["returncode"] != 0 and "SIGKILL" in after_kill["output"], after_kill["output"]
    # The newest checkpoint-N holds only the pending tag: HF's glob for global_step* finds nothing there.
    assert ".global_step4.ds_fastckpt-tmp" in after_kill["checkpoint_4"]
    assert not [entry for entry in after_kill["checkpoint_4"] if entry.startswith("global_step")]
    assert after_kill["last_complete_checkpoint"] == str(out / "killed" / "checkpoint-2")
    # resume_from_checkpoint=True, nothing else: the Trainer passes over checkpoint-4 and resumes at step 2.
    result = job(one_process["resume"], "killed")
    assert result["resumed_from"] == "True" and result["started_at_step"] == 2
    assert result["global_step"] == 8
    assert_same_final_state(out, "killed", "ref_z2")  # async saves, resumed at step 2: still bit-exact


def test_resuming_from_a_pending_checkpoint_by_name_says_what_to_resume_from(one_process):
    out, after_kill = one_process["out"], one_process["after_kill"]
    result = job(one_process["resume"], "killed_by_name")
    folder, complete = out / "killed" / "checkpoint-4", out / "killed" / "checkpoint-2"
    assert result["type"] == "PendingCheckpointError" and result["is_pending_error"], result
    assert result["instead"] == str(complete)
    message = result["message"]
    assert f"checkpoint 'global_step4' in {folder} was never committed" in message
    assert ".global_step4.ds_fastckpt-tmp" in message and "still in flight when the process" in message
    assert f"trainer.train(resume_from_checkpoint={str(complete)!r})" in message
    assert result["dirs_after"] == after_kill["checkpoint_4"]  # the failed resume changed nothing there


def test_migration_from_deepspeeds_default_engine(one_process):
    out = one_process["out"]
    assert job(one_process["first"], "migrate")["dirs"][-2:] == ["checkpoint-2", "checkpoint-4"]
    written_by_default_engine = one_process["migrate_checkpoint_4"]
    assert "mp_rank_00_model_states.pt" in written_by_default_engine and MANIFEST_NAME not in written_by_default_engine
    result = job(one_process["resume"], "migrate")
    assert result["resumed_from"] == "True" and result["global_step"] == 8
    assert_same_final_state(out, "migrate", "ref_z2")


def test_last_complete_checkpoint_skips_a_damaged_checkpoint(one_process, tmp_path, caplog):
    output_dir = tmp_path / "run"
    shutil.copytree(one_process["out"] / "ref_z2", output_dir)
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-8")
    (output_dir / "checkpoint-8" / "global_step8" / MANIFEST_NAME).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ds_fastckpt"):
        assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-6")
    assert any("checkpoint-8" in record.getMessage() and "damaged" in record.getMessage()
               for record in caplog.records)
    shutil.rmtree(output_dir / "checkpoint-6" / "global_step6")
    assert last_complete_checkpoint(output_dir) is None
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_importing_the_package_does_not_import_transformers():
    code = ("import sys, ds_fastckpt, ds_fastckpt.integrations, ds_fastckpt.integrations.huggingface as hf\n"
            "assert 'transformers' not in sys.modules, 'imported transformers'\n"
            "assert 'accelerate' not in sys.modules, 'imported accelerate'\n"
            "import transformers\n"
            "assert issubclass(hf.FastAioTrainerCallback, transformers.TrainerCallback)\n"
            "assert ds_fastckpt.integrations.FastAioTrainerCallback is hf.FastAioTrainerCallback\n"
            # imported after ds_fastckpt: wired by the import hook, once even when installed again
            "import transformers.trainer as trainer, transformers.trainer_utils as utils\n"
            "from transformers.integrations import deepspeed_load_checkpoint\n"
            "from accelerate import Accelerator\n"
            "ds_fastckpt.integrations.wiring.install()\n"
            "for wired in (trainer.get_last_checkpoint, utils.get_last_checkpoint, trainer.deepspeed_load_checkpoint,\n"
            "              deepspeed_load_checkpoint, trainer.Trainer.__init__, Accelerator.load_state):\n"
            "    assert getattr(wired, '_ds_fastckpt_wired', False), wired\n"
            "    assert not getattr(wired.__wrapped__, '_ds_fastckpt_wired', False), wired\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
