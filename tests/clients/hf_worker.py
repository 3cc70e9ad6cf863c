"""Hugging Face Trainer jobs on CPU with DeepSpeed and the fast_aio engine, for tests/clients/test_hf_trainer.py.

Run under torchrun: ``hf_worker.py PLAN OUT``. Each plan runs several small
Trainer jobs in this process, one after the other, each with its own
``OUT/<job>`` output_dir, and writes what it saw to ``OUT/<plan>.rank<R>.json``
after every job (so the jobs that finished are reported if a later one
hangs or dies). A job that raises is reported with its error and the plan
goes on. Final parameters (gathered under ZeRO-3) go to
``OUT/<job>.params.pt`` from rank 0.

Plans: ``first`` (1 process), ``kill`` (1 process, SIGKILLed in an async
save), ``resume`` (1 process, after ``first`` and ``kill``), ``two_first``
and ``two_resume`` (2 processes), ``two_replicate_first`` and
``two_replicate_resume`` (2 processes, replicating to the remote tier
``HF_REPLICATE_URL``, tests/remote/test_hf_remote.py).
"""

import os
import signal
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # accelerate's DeepSpeed path on a CPU-only host

import deepspeed  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import ds_fastckpt  # noqa: E402  (the import is the wiring, also for transformers imported before it)
from ds_fastckpt import open_fds_under  # noqa: E402
from ds_fastckpt.decisions.resume import choose_resume_tag  # noqa: E402
from ds_fastckpt.format.names import LOCK_NAME  # noqa: E402
from tests.clients.plans import run_jobs, zero2_state  # noqa: E402

STEPS = 8
SEQ = 16
KILL_AT_STEP = 4  # the async job dies in the Trainer's second save (step 4); the first (step 2) is complete


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class TokenData(torch.utils.data.Dataset):
    """Synthetic token ids: the same every run."""

    def __init__(self, count: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 128, (count, SEQ), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def ds_config(stage: int, engine: str = "fast_aio", **fast_aio) -> dict:
    checkpoint = {} if engine is None else {"engine": engine, "fast_aio": fast_aio}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto", "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "checkpoint": checkpoint,
    }


class FdRecorder(TrainerCallback):
    """After every save: this process's descriptors into output_dir."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.counts, self.deleted, self.locks, self.samples = [], 0, [], []

    def on_save(self, args, state, control, **kwargs):
        entries = open_fds_under(self.output_dir)
        self.counts.append(len(entries))
        self.deleted += sum(entry.deleted for entry in entries)
        self.locks.append(sum(entry.target.endswith("/" + LOCK_NAME) for entry in entries))
        if len(self.samples) < 3 or state.global_step % 10 == 0:
            self.samples.append([f"{entry.target}{' (deleted)' if entry.deleted else ''}" for entry in entries])
        return control


class PerturbAfterLastSave(TrainerCallback):
    """Moves the weights away from the last checkpoint once it is saved, so that loading the best model shows."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step >= state.max_steps:
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(1.0)
        return control


class StopAtStep(TrainerCallback):
    """Ends training at ``step`` of a longer schedule (a job that runs out of time), after that step's save."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class KillAtSave(TrainerCallback):
    """SIGKILLs this process right after the Trainer's save at ``step`` returned."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        return control


def make_trainer(output_dir: Path, config: dict, max_steps: int = STEPS, save_steps: int = 2, callbacks=(),
                 **extra) -> Trainer:
    AcceleratorState._reset_state()  # a new Trainer, a new DeepSpeed plugin; the process group is kept
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="steps", save_steps=save_steps, save_total_limit=2, logging_steps=1, report_to=[],
        seed=42, deepspeed=config, accelerator_config={"use_configured_state": True}, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, **extra)
    return Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenData(64), callbacks=list(callbacks),
                   eval_dataset=TokenData(16, seed=1) if extra.get("eval_strategy") else None)


def gathered_params(trainer: Trainer) -> dict:
    model = trainer.model_wrapped.module
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {name: param.detach().clone() for name, param in model.named_parameters()}


def finish(trainer: Trainer, out: Path, job: str, result: dict) -> None:
    params = gathered_params(trainer)
    if rank() == 0:
        torch.save(params, out / f"{job}.params.pt")
    result["global_step"] = trainer.state.global_step
    result["dirs"] = sorted(os.listdir(trainer.args.output_dir))


def train_job(out: Path, job: str, config: dict, resume=None, stop_at: int = STEPS, **kwargs) -> dict:
    """Trains the 8-step schedule from scratch or ``resume``, ending at step ``stop_at``."""
    callbacks = list(kwargs.pop("callbacks", ())) + ([StopAtStep(stop_at)] if stop_at < STEPS else [])
    trainer = make_trainer(out / job, config, callbacks=callbacks, **kwargs)
    result = {"resumed_from": resume if not isinstance(resume, bool) else "True"}
    trainer.train(resume_from_checkpoint=resume)
    finish(trainer, out, job, result)
    trainer.model_wrapped.destroy()
    return result


def save_model_beside_checkpoints(out: Path, job: str, stage: int) -> dict:
    """Trains 4 of 8 steps (checkpoint-2, checkpoint-4), then ``trainer.save_model()`` into output_dir itself."""
    trainer = make_trainer(out / job, ds_config(stage), callbacks=[StopAtStep(4)])
    trainer.train()
    finish(trainer, out, job, result := {})
    try:
        trainer.save_model()
        result["save_model"] = "ok"
    except Exception as error:  # reported, so that the resume cases still run
        result["save_model"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    result["dirs_after_save_model"] = sorted(os.listdir(out / job))
    result["resume_tag_of_output_dir"] = choose_resume_tag(out / job)[0]
    result["fds_after_save_model"] = [entry.target for entry in open_fds_under(out / job)]
    trainer.model_wrapped.destroy()
    return result


def descriptors(out: Path, job: str, engine) -> dict:
    """40 steps, a save after each, two checkpoint-N kept; records the descriptors into output_dir."""
    recorder = FdRecorder(out / job)
    trainer = make_trainer(out / job, ds_config(2, engine), max_steps=40, save_steps=1, callbacks=[recorder])
    trainer.train()
    result = {"saves": len(recorder.counts), "max_fds": max(recorder.counts), "last_fds": recorder.counts[-1],
              "max_locks": max(recorder.locks), "deleted_fds_seen": recorder.deleted, "samples": recorder.samples,
              "checkpoint_dirs": sorted(name for name in os.listdir(out / job) if name.startswith("checkpoint-"))}
    if engine == "fast_aio":
        result["save_16bit_model"] = save_16bit_beside_checkpoint(trainer, out / job / "checkpoint-40")
    trainer.model_wrapped.destroy()
    return result


def save_16bit_beside_checkpoint(trainer: Trainer, checkpoint_dir: Path) -> dict:
    """ZeRO-2: ``engine.save_16bit_model(D)`` into a checkpoint-N dir, then ``load_checkpoint(D)`` resumes step N."""
    engine = trainer.model_wrapped
    result = {"step": engine.global_steps}
    before = zero2_state(engine)
    try:
        result["returned"] = engine.save_16bit_model(str(checkpoint_dir))
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"
        return result
    weights_path = checkpoint_dir / "pytorch_model.bin"
    result["weights_file"] = weights_path.name if weights_path.exists() else None
    if weights_path.exists():
        weights = torch.load(weights_path, map_location="cpu", weights_only=True)
        module = engine.module.state_dict()
        result["weights_equal_module"] = sorted(weights) == sorted(module) and all(
            torch.equal(weights[name], module[name]) for name in module)
        result["weights_dtypes"] = sorted({str(tensor.dtype) for tensor in weights.values()})
    result["dirs"] = sorted(os.listdir(checkpoint_dir))
    result["resume_tag"] = choose_resume_tag(checkpoint_dir)[0]
    with torch.no_grad():  # move everything away from the checkpoint, so the load has something to restore
        for param in engine.module.parameters():
            param.add_(1.0)
        for partition in engine.optimizer.single_partition_of_fp32_groups:
            partition.add_(1.0)
    try:
        load_path, _ = engine.load_checkpoint(str(checkpoint_dir))
    except Exception as error:
        result["load_error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"
        return result
    result["load_path"] = load_path
    result["global_steps_after_load"] = engine.global_steps
    after = zero2_state(engine)
    result["state_equal_after_load"] = sorted(before) == sorted(after) and all(
        torch.equal(before[key], after[key]) for key in before)
    return result


def best_model(out: Path, job: str, asynchronous: bool) -> dict:
    """``load_best_model_at_end`` where the best checkpoint is the last save (the loss keeps falling).

    No ``FastAioTrainerCallback`` is passed: importing ds_fastckpt gave the Trainer one, ahead of the user's
    callbacks, so the last save is committed before ``PerturbAfterLastSave`` moves the weights.
    """
    config = ds_config(2, **({"async": True} if asynchronous else {}))
    trainer = make_trainer(out / job, config, callbacks=[PerturbAfterLastSave()], eval_strategy="steps",
                           eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                           greater_is_better=False)
    callbacks = [type(callback).__name__ for callback in trainer.callback_handler.callbacks]
    trainer.train()
    result = {"callbacks": callbacks,
              "best_model_checkpoint": os.path.relpath(trainer.state.best_model_checkpoint, out / job),
              "eval_losses": [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]}
    finish(trainer, out, job, result)
    trainer.model_wrapped.destroy()
    return result


def killed_async(out: Path, job: str) -> dict:
    trainer = make_trainer(out / job, ds_config(2, **{"async": True}), callbacks=[KillAtSave(KILL_AT_STEP)])
    trainer.train()
    return {"survived": True}  # never reached: the callback kills this process at step KILL_AT_STEP


class RecordStart(TrainerCallback):
    """Records the step training starts at (the resumed checkpoint's)."""

    def __init__(self, result: dict):
        self.result = result

    def on_train_begin(self, args, state, control, **kwargs):
        self.result["started_at_step"] = state.global_step
        return control


def resume_pending_by_name(out: Path, job: str) -> dict:
    """``resume_from_checkpoint=<the pending checkpoint-N>``: reported, and nothing in output_dir changes."""
    trainer = make_trainer(out / job, ds_config(2, **{"async": True}))
    checkpoint = out / job / f"checkpoint-{KILL_AT_STEP}"
    result = {"checkpoint": str(checkpoint)}
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint))
        result["trained"] = True
    except Exception as error:
        result.update(type=type(error).__name__, message=str(error),
                      is_pending_error=isinstance(error, getattr(ds_fastckpt, "PendingCheckpointError", ())),
                      instead=str(getattr(error, "instead", None)))
    result["dirs_after"] = sorted(os.listdir(checkpoint))
    if trainer.model_wrapped is not trainer.model:
        trainer.model_wrapped.destroy()
    return result


def resume_after_kill(out: Path, job: str) -> dict:
    """``resume_from_checkpoint=True``, nothing else: the wiring passes over the pending checkpoint-N."""
    result = {}
    result.update(train_job(out, job, ds_config(2, **{"async": True}), resume=True,
                            callbacks=[RecordStart(result)]))
    return result


def replicated(out: Path, job: str, resume=None, stop_at: int = STEPS) -> dict:
    """A ZeRO-2 job replicating to ``HF_REPLICATE_URL`` (remote ``keep_last`` 2); reports what the remote tier holds
    once the job's engine is destroyed (which waits for the uploads)."""
    from ds_fastckpt.remote.catalog import read_catalog
    from ds_fastckpt.remote.url import open_store

    url = os.environ["HF_REPLICATE_URL"]
    config = ds_config(2, replicate={"url": url, "keep_last": 2, "request_timeout_s": 10, "wait_timeout_s": 120})
    result = {}
    result.update(train_job(out, job, config, resume=resume, stop_at=stop_at, callbacks=[RecordStart(result)]))
    catalog = read_catalog(open_store(url, part_size=16 << 20, concurrency=2, request_timeout_s=10))
    result["remote"] = {tag: sorted(record.path for record in manifest.client_files)
                        for tag, manifest in catalog.complete.items()}
    result["remote_latest"] = catalog.latest
    return result


def plan_jobs(plan: str, out: Path):
    if plan == "first":
        yield "ref_z2", lambda: train_job(out, "ref_z2", ds_config(2))
        yield "ref_z3", lambda: train_job(out, "ref_z3", ds_config(3))
        yield "part_z2", lambda: train_job(out, "part_z2", ds_config(2), stop_at=4)
        yield "part_z3", lambda: save_model_beside_checkpoints(out, "part_z3", 3)
        yield "migrate", lambda: train_job(out, "migrate", ds_config(2, engine=None), stop_at=4)
        yield "best_sync", lambda: best_model(out, "best_sync", asynchronous=False)
        yield "best_async", lambda: best_model(out, "best_async", asynchronous=True)
        yield "fds_fast_aio", lambda: descriptors(out, "fds_fast_aio", "fast_aio")
        yield "fds_default", lambda: descriptors(out, "fds_default", None)
    elif plan == "kill":
        yield "killed", lambda: killed_async(out, "killed")
    elif plan == "resume":
        yield "part_z2", lambda: train_job(out, "part_z2", ds_config(2), resume=True)
        yield "part_z3", lambda: train_job(out, "part_z3", ds_config(3), resume=True)
        yield "migrate", lambda: train_job(out, "migrate", ds_config(2), resume=True)
        yield "killed_by_name", lambda: resume_pending_by_name(out, "killed")  # before "killed" rewrites it
        yield "killed", lambda: resume_after_kill(out, "killed")
    elif plan == "two_first":
        yield "two_ref_z3", lambda: train_job(out, "two_ref_z3", ds_config(3))
        yield "two_part_z3", lambda: save_model_beside_checkpoints(out, "two_part_z3", 3)
    elif plan == "two_resume":
        yield "two_part_z3", lambda: train_job(out, "two_part_z3", ds_config(3), resume=True)
    elif plan == "two_replicate_first":
        yield "two_ref_z2", lambda: train_job(out, "two_ref_z2", ds_config(2))
        yield "two_replicated", lambda: replicated(out, "two_replicated", stop_at=6)
    elif plan == "two_replicate_resume":
        yield "two_replicated", lambda: replicated(out, "two_replicated", resume=True)
    else:
        raise SystemExit(f"unknown plan {plan!r}")


def main() -> None:
    plan, out = sys.argv[1], Path(sys.argv[2])
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None  # for running some jobs by hand
    PartialState(backend="gloo")
    report_path = out / f"{plan}.rank{rank()}.json"
    report = {"rank": rank(), "world_size": torch.distributed.get_world_size(), "jobs": {}}
    run_jobs([(job, run) for job, run in plan_jobs(plan, out) if only is None or job in only], report, report_path)


if __name__ == "__main__":
    main()
