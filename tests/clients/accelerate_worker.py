"""accelerate jobs on CPU with DeepSpeed ZeRO-2 and async fast_aio saves, for tests/clients/test_accelerate.py.

Run under torchrun with ``ACCELERATE_USE_DEEPSPEED=true`` (what ``accelerate
launch --use_deepspeed`` sets; torchrun because ``accelerate launch`` wants a
GPU-shaped config here): ``accelerate_worker.py PLAN OUT``. Every job uses
``accelerator.save_state()`` with ``ProjectConfiguration(automatic_checkpoint_naming=True)``,
so folders are ``OUT/<job>/checkpoints/checkpoint_<N>``. Each rank writes what
it saw to ``OUT/<plan>.rank<R>.json`` after every job. Plans:

``first``: ``round`` (saves at steps 2 and 4, trains on, then ``load_state()``
and ``load_state(checkpoint_0)`` must give back the saved states bit for
bit), then ``killed`` (saves at step 2, trains to step 4, saves again and is
SIGKILLed right after that ``save_state()`` returned, on every rank).
``resume``: ``killed`` in a new job: ``load_state(checkpoint_1)`` (pending),
``engine.load_checkpoint(checkpoint_1, "pytorch_model")``, then ``load_state()``.
"""

import json
import os
import signal
import sys
import traceback
from pathlib import Path

os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # accelerate's DeepSpeed path on a CPU-only host

import torch  # noqa: E402
from accelerate import Accelerator, DeepSpeedPlugin  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration  # noqa: E402

import ds_fastckpt  # noqa: E402,F401  (the import is the wiring, also for accelerate imported before it)
from tests.clients.plans import run_jobs, zero2_state  # noqa: E402


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"engine": "fast_aio", "fast_aio": {"async": True}},
    }


def make(out: Path, job: str):
    """A new Accelerator (the process group is kept), a tiny model and AdamW, prepared."""
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config()),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
        project_config=ProjectConfiguration(project_dir=str(out / job), automatic_checkpoint_naming=True))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def train(accelerator, model, optimizer, steps) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(1000 * step + accelerator.process_index)
        inputs = torch.randn(4, 16, generator=generator)
        loss = model(inputs).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def full_state(engine) -> dict:
    state = zero2_state(engine)
    state["global_steps"] = torch.tensor(engine.global_steps)
    return state


def differences(got: dict, want: dict) -> list:
    if sorted(got) != sorted(want):
        return [f"keys {sorted(set(got) ^ set(want))}"]
    return [key for key in want if not (torch.equal(got[key], want[key]) and got[key].dtype == want[key].dtype)]


def round_trip(out: Path, job: str) -> dict:
    accelerator, model, optimizer = make(out, job)
    train(accelerator, model, optimizer, [1, 2])
    accelerator.save_state()
    at_2 = full_state(model)
    train(accelerator, model, optimizer, [3, 4])
    accelerator.save_state()
    at_4 = full_state(model)
    train(accelerator, model, optimizer, [5, 6])
    moved = differences(full_state(model), at_4)
    accelerator.load_state()
    newest = differences(full_state(model), at_4)
    accelerator.load_state(str(out / job / "checkpoints" / "checkpoint_0"))
    oldest = differences(full_state(model), at_2)
    result = {"moved_after_save": len(moved), "newest_differences": newest, "oldest_differences": oldest,
              "folders": sorted(os.listdir(out / job / "checkpoints"))}
    model.destroy()
    return result


def killed(out: Path, job: str, report_path: Path, report: dict) -> dict:
    accelerator, model, optimizer = make(out, job)
    train(accelerator, model, optimizer, [1, 2])
    accelerator.save_state()
    torch.save(full_state(model), out / f"{job}.step2.rank{accelerator.process_index}.pt")
    train(accelerator, model, optimizer, [3, 4])  # step 3 commits checkpoint_0
    accelerator.save_state()  # checkpoint_1: its DeepSpeed tag is in flight until step 5, which never comes
    accelerator.wait_for_everyone()
    report["jobs"][job] = {"killed": True}
    report_path.write_text(json.dumps(report, indent=1, default=str))
    os.kill(os.getpid(), signal.SIGKILL)


def resume_killed(out: Path, job: str) -> dict:
    accelerator, model, optimizer = make(out, job)
    result = {"folders": {name: sorted(os.listdir(out / job / "checkpoints" / name))
                          for name in sorted(os.listdir(out / job / "checkpoints"))}}
    try:
        accelerator.load_state(str(out / job / "checkpoints" / "checkpoint_1"))
        result["explicit"] = {"loaded": True}
    except Exception as error:
        result["explicit"] = {"type": type(error).__name__, "module": type(error).__module__, "message": str(error),
                              "is_file_not_found": isinstance(error, FileNotFoundError),
                              "is_pending_error": isinstance(error, getattr(ds_fastckpt, "PendingCheckpointError",
                                                                            ())),
                              "attributes": {name: str(getattr(error, name, None))
                                             for name in ("folder", "tag", "pending_dir", "instead")}}
    try:  # DeepSpeed's own call, as accelerate makes it, past accelerate
        model.load_checkpoint(str(out / job / "checkpoints" / "checkpoint_1"), "pytorch_model")
        result["engine_explicit"] = {"loaded": True}
    except Exception as error:
        result["engine_explicit"] = {"type": type(error).__name__, "message": str(error)}
    try:
        accelerator.load_state()
        want = torch.load(out / f"{job}.step2.rank{accelerator.process_index}.pt", weights_only=True)
        result["automatic"] = {"differences": differences(full_state(model), want)}
    except Exception as error:
        traceback.print_exc()
        result["automatic"] = {"type": type(error).__name__, "message": str(error)}
    model.destroy()
    return result


def main() -> None:
    plan, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    report_path = out / f"{plan}.rank{rank}.json"
    report = {"rank": rank, "jobs": {}}
    if plan == "first":
        jobs = [("round", lambda: round_trip(out, "round")),
                ("killed", lambda: killed(out, "killed", report_path, report))]
    elif plan == "resume":
        jobs = [("killed", lambda: resume_killed(out, "killed"))]
    else:
        raise SystemExit(f"unknown plan {plan!r}")
    run_jobs(jobs, report, report_path)


if __name__ == "__main__":
    main()
