"""Async checkpoints in flight when a job ends: each mode is one job; each job also loads what the last left.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/async_exit_worker.py MODE OUT_DIR
    python tests/engine/async_exit_worker.py fork OUT_DIR          (one process, no torchrun)

Modes under torchrun, run in this order: ``crash`` (rank 1 dies of an uncaught exception while rank 0 trains
on), ``destroy`` (destroy_process_group() with a checkpoint in flight, then a normal exit), ``bypass`` (the same
through the unhooked destroy_process_group, as a reference taken before ds_fastckpt was imported would be).
Each job first resumes, in fresh engines, from what the job before it left (``LOADS``) and writes what it
found as JSON per rank. ``fork``: a child made with os.fork() exits normally while its parent has a checkpoint
in flight.
"""

import atexit
import concurrent.futures
import json
import os
import sys
import threading
import time
from pathlib import Path

_PARENT = os.getpid()


@atexit.register  # first registered, so it runs last: after every handler the child inherited
def _end_forked_child() -> None:
    # With a DeepSpeed engine in the parent (with or without ds_fastckpt), torch 2.13 + DeepSpeed 0.19.8 make a
    # forked child segfault in the interpreter's final garbage collection, after the atexit handlers.
    if os.getpid() != _PARENT:
        os._exit(0)


import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ds_fastckpt.format.names import MANIFEST_NAME  # noqa: E402
from tests.ds_helpers import full_state, init_engine, single_process_env, train  # noqa: E402

STAGE = 1  # parallel_writers applies (ZeRO 0-2)
WRITERS = {"all": {}, "off": {"parallel_writers": "off"}}  # "all" is the default on shared storage
LONG = {"commit_timeout_s": 300, "async_timeout_s": 300}  # longer than any test waits for a job
LOADS = {"crash": (), "destroy": ("crash",), "bypass": ("destroy_all", "destroy_off")}


def same_state(expected, actual) -> bool:
    return expected.keys() == actual.keys() and all(
        torch.equal(value, actual[key]) if isinstance(value, torch.Tensor) else value == actual[key]
        for key, value in expected.items())


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def save_expected(engine, out: Path, case: str) -> None:
    torch.save(full_state(engine), out / f"expected_{case}_rank{rank()}.pt")


def in_flight_at_teardown(out: Path, unhooked: bool) -> None:
    """One engine per parallel_writers mode, each with global_step1 committed and global_step2 in flight."""
    import torch.distributed as dist

    engines = []
    for writers, options in WRITERS.items():
        case = f"{'bypass' if unhooked else 'destroy'}_{writers}"
        engine = init_engine(STAGE, {"keep_last": 0, "async": True, **LONG, **options}, seed=0)
        train(engine, 1)
        engine.save_checkpoint(out / case)
        if unhooked:  # global_step2 cannot be committed: resume must load this one
            save_expected(engine, out, case)
        train(engine, 1)  # commits global_step1
        engine.save_checkpoint(out / case)  # global_step2, in flight
        if not unhooked:
            save_expected(engine, out, case)
        engines.append(engine)
    destroy = dist.destroy_process_group
    if unhooked:  # what a reference taken before ds_fastckpt was imported calls
        destroy = getattr(destroy, "__wrapped__", destroy)
    destroy()  # accelerate's end_training(), the last line of many scripts


def crash(out: Path) -> None:
    """global_step1 committed, global_step2 in flight; then rank 1 dies, rank 0 goes on training."""
    engine = init_engine(STAGE, {"keep_last": 0, "async": True, **LONG}, seed=0)
    train(engine, 1)
    engine.save_checkpoint(out / "crash")
    save_expected(engine, out, "crash")
    train(engine, 1)  # commits global_step1
    engine.save_checkpoint(out / "crash")
    if rank() == 1:
        raise RuntimeError("rank 1 fails with global_step2 in flight")
    train(engine, 1)  # waits in a collective for rank 1


def resume(out: Path, mode: str) -> None:
    """Loads each save_dir of ``LOADS[mode]`` in a fresh engine; what it loaded, and whether it is what was saved."""
    report = {}
    for case in LOADS[mode]:
        save_dir = out / case
        try:
            engine = init_engine(STAGE, {"keep_last": 0, "verify": "checksum"}, seed=7)
            load_path, _ = engine.load_checkpoint(save_dir)
            expected = out / f"expected_{case}_rank{rank()}.pt"
            report[case] = {"load_path": load_path, "global_steps": engine.global_steps,
                            "equal": same_state(torch.load(expected, weights_only=False), full_state(engine))}
            engine.destroy()
        except Exception as error:  # reported, so one broken case does not hide the others
            report[case] = {"error": f"{type(error).__name__}: {error}"}
    (out / f"{mode}_rank{rank()}.json").write_text(json.dumps(report))


def complete_tags(save_dir: Path) -> list:
    return sorted(p.name for p in save_dir.iterdir() if (p / MANIFEST_NAME).is_file())


def fork_child(deadline_s: float = 60) -> dict:
    """Forks a child that exits at once through sys.exit(0); its exit code and how long it took."""
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal exit: the atexit handlers inherited from the parent run here
    while time.monotonic() - started < deadline_s:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"exit_code": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - started}
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return {"exit_code": None, "seconds": time.monotonic() - started}


def fork(out: Path) -> None:
    single_process_env()
    save_dir = out / "fork"
    engine = init_engine(STAGE, {"keep_last": 0, "async": True, **LONG}, seed=0)
    checkpoint_engine = engine.checkpoint_engine
    write, release = checkpoint_engine._write_file, threading.Event()

    def held_write(*args):
        release.wait(120)
        return write(*args)

    report = {}
    # "ended": the writes of global_step1 have ended when the child is made; "running": a write of
    # global_step2 is still running (held) then. After the child, the parent's next step commits.
    for case, tag in (("ended", "global_step1"), ("running", "global_step2")):
        found = report[case] = {}
        try:
            train(engine, 1)
            if case == "running":
                checkpoint_engine._write_file = held_write
            engine.save_checkpoint(save_dir, tag=tag)
            saved = full_state(engine)
            if case == "ended":
                concurrent.futures.wait(checkpoint_engine._save.pending_writes)
            found.update(fork_child())
            found["complete_after_child"] = complete_tags(save_dir)
            release.set()
            train(engine, 1)  # commits the checkpoint
            found["step_error"] = None
        except Exception as error:
            release.set()
            found["step_error"] = f"{type(error).__name__}: {error}"
    report["complete"] = complete_tags(save_dir)
    loader = init_engine(STAGE, {"keep_last": 0, "verify": "checksum"}, seed=7)
    load_path, _ = loader.load_checkpoint(save_dir, tag="global_step2")
    report["load_path"], report["equal"] = load_path, same_state(saved, full_state(loader))
    (out / "fork.json").write_text(json.dumps(report))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "fork":
        fork(out)
        return
    resume(out, mode)
    if mode == "crash":
        crash(out)
    else:
        in_flight_at_teardown(out, unhooked=mode == "bypass")


if __name__ == "__main__":
    main()
