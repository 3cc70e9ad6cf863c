"""Run under torchrun with 2 ranks: saves, loads and rotates, then writes what each rank observed as JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/two_rank_worker.py OUT_DIR
"""

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from ds_fastckpt import deleted_fds_under, open_fds_under
from tests.ds_helpers import full_state, init_engine, save_twice, train


def same_state(expected, actual) -> bool:
    import torch

    if expected.keys() != actual.keys():
        return False
    return all(
        torch.equal(value, actual[key]) if isinstance(value, torch.Tensor) else value == actual[key]
        for key, value in expected.items())


def round_trips(save_root: Path, async_save: bool = False) -> dict:
    """Sync, or async with training going on for 2 steps after the save (the commit happens in the first)."""
    results = {}
    for stage in (0, 1, 2, 3):
        save_dir = save_root / f"stage{stage}"
        saver = init_engine(stage, {"keep_last": 2, "async": async_save}, seed=0)
        train(saver, 3)
        saver.save_checkpoint(save_dir)
        saved = full_state(saver)
        if async_save:
            train(saver, 2)
            saver.destroy()
        loader = init_engine(stage, {"keep_last": 2, "verify": "checksum"}, seed=7)
        differed = not same_state(saved, full_state(loader))
        load_path, _ = loader.load_checkpoint(save_dir)
        results[stage] = {"differed_before": differed, "equal_after": same_state(saved, full_state(loader)),
                          "load_path": load_path}
    return results


def rotation(save_dir: Path, rank: int) -> dict:
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "unrelated.txt").write_text("mine")
    engine = init_engine(2, {"keep_last": 2, "keep_every": 20, "fd_audit": "raise"})
    deleted_seen = 0
    spare_inodes = {}
    for step in range(1, 51):
        if step == 50:  # the files of the spare (global_step47's) that the last save may write over
            spare_inodes = {path.name: path.stat().st_ino for path in save_dir.glob(".*.ds_fastckpt-spare/*.pt")}
        train(engine, 1)
        engine.save_checkpoint(save_dir)
        deleted_seen += len(deleted_fds_under(save_dir))
    newest = save_dir / "global_step50"
    return {
        "recycled": sorted(name for name, inode in spare_inodes.items() if (newest / name).stat().st_ino == inode),
        "dirs": sorted(p.name for p in save_dir.iterdir() if p.is_dir()),
        "unrelated": (save_dir / "unrelated.txt").read_text(),
        "latest": (save_dir / "latest").read_text(),
        "open_fds": [entry.target for entry in open_fds_under(save_dir)],
        "deleted_fds_seen": deleted_seen,
        "files_in_newest": sorted(p.name for p in (save_dir / "global_step50").iterdir()),
    }


def resume_without_latest(save_dir: Path, rank: int) -> dict:
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        (save_dir / "latest").unlink()
    dist.barrier()
    engine = init_engine(2, {"keep_last": 2}, seed=3)
    load_path, _ = engine.load_checkpoint(save_dir)
    return {"load_path": load_path, "global_steps": engine.global_steps}


def broken_latest(save_dir: Path, rank: int) -> dict:
    """Resume when `latest` is empty, names an older complete tag, or an unfinished one; every rank must agree."""
    import torch.distributed as dist

    seen = {}
    for case, text in (("empty", ""), ("older", "global_step20"), ("incomplete", "global_step51")):
        dist.barrier()
        if rank == 0:
            (save_dir / "global_step51").mkdir(exist_ok=True)
            (save_dir / "latest").write_text(text)
        dist.barrier()
        engine = init_engine(2, {"keep_last": 2}, seed=3)
        load_path, _ = engine.load_checkpoint(save_dir)
        seen[case] = {"load_path": load_path, "global_steps": engine.global_steps}
    return seen


def keep_last_one(save_dir: Path) -> dict:
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    engine.save_checkpoint(save_dir, tag="first")
    train(engine, 1)
    engine.save_checkpoint(save_dir, tag="second", save_latest=False)
    after_second = sorted(p.name for p in save_dir.iterdir() if p.is_dir())
    train(engine, 1)
    engine.save_checkpoint(save_dir, tag="third")
    return {"after_second": after_second, "after_third": sorted(p.name for p in save_dir.iterdir() if p.is_dir())}


def injected_leak(save_dir: Path) -> dict:
    """A writer that keeps an extra descriptor per file, as FastFileWriter did before DeepSpeed 0.19.1."""
    import ds_fastckpt.engine.checkpoint_engine
    from ds_fastckpt import AioFileWriter, FdLeakError

    leaked = []

    class LeakyWriter(AioFileWriter):

        def __init__(self, path, **kwargs):
            super().__init__(path, **kwargs)
            leaked.append(os.open(path, os.O_RDONLY))

    original = ds_fastckpt.engine.checkpoint_engine.AioFileWriter
    ds_fastckpt.engine.checkpoint_engine.AioFileWriter = LeakyWriter
    engine = init_engine(1, {"keep_last": 1, "fd_audit": "raise"})
    train(engine, 1)
    try:
        engine.save_checkpoint(save_dir)
        message = None
    except FdLeakError as error:
        message = str(error)
    finally:
        ds_fastckpt.engine.checkpoint_engine.AioFileWriter = original
        for fd in leaked:
            os.close(fd)
    return {"leaked": len(leaked), "message": message}


def failing_write_on_one_rank(save_dir: Path, rank: int, async_save: bool, stage: int = 2, width: int = 32,
                              **options) -> dict:
    """Rank 1's first write fails with EIO: every rank must raise at the commit (none waits), then train and save
    on. ``options`` are more ``fast_aio`` options."""
    import errno

    from ds_fastckpt.native.fault_injection import inject_fault

    engine = init_engine(stage, {"keep_last": 2, "async": async_save, **options}, width=width)
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    train(engine, 1)  # commits an async save
    raised = None
    try:
        with inject_fault("write", errno.EIO) if rank == 1 else nullcontext():
            engine.save_checkpoint(save_dir)
            if async_save:
                train(engine, 1)  # the commit, where an async failure surfaces
    except Exception as error:
        raised = {"type": type(error).__name__, "message": str(error), "errno": getattr(error, "errno", None)}
    latest_after_failure = (save_dir / "latest").read_text()
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    engine.destroy()
    return {"raised": raised, "latest_after_failure": latest_after_failure, "latest_after_next": (save_dir /
            "latest").read_text(), "dirs": sorted(p.name for p in save_dir.iterdir() if p.is_dir())}


def skip_damaged(save_dir: Path, rank: int) -> dict:
    """A bit of rank 1's shard of the newest checkpoint flips; both ranks must agree to resume the older one."""
    import torch.distributed as dist

    older = save_twice(init_engine(2, {"keep_last": 0}), save_dir)
    dist.barrier()
    if rank == 0:
        victim = save_dir / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    dist.barrier()
    loader = init_engine(2, {"keep_last": 0, "verify": "checksum", "skip_damaged_on_resume": True}, seed=3)
    load_path, _ = loader.load_checkpoint(save_dir)
    return {"load_path": load_path, "same_state": same_state(older, full_state(loader))}


def main():
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "round_trips": round_trips(out / "round_trips")}
    report["async_round_trips"] = round_trips(out / "async_round_trips", async_save=True)
    report["rotation"] = rotation(out / "rotation", rank)
    report["resume"] = resume_without_latest(out / "rotation", rank)
    report["broken_latest"] = broken_latest(out / "rotation", rank)
    report["keep_last_one"] = keep_last_one(out / "keep_last_one")
    report["injected_leak"] = injected_leak(out / "leak")
    report["skip_damaged"] = skip_damaged(out / "skip_damaged", rank)
    report["failing_write"] = {mode: failing_write_on_one_rank(out / f"failing_write_{mode}", rank, mode == "async")
                               for mode in ("sync", "async")}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
