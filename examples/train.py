"""Train a small model with DeepSpeed and checkpoint it through ds_fastckpt's ``fast_aio`` engine.

Saves every ``--save-every`` steps (rotation keeps the newest ``keep_last``
of examples/ds_config.json), resumes from the checkpoint ``latest`` names when
``--save-dir`` has one (the newest complete one when ``latest`` is broken), and logs each save's size, seconds and GB/s and the
tags kept. ``--compare-default`` also times DeepSpeed's default engine
(``torch.save``, not fsynced) on the same model in the same run.

    torchrun --nproc_per_node 2 examples/train.py --save-dir example_ckpts
"""

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

import ds_fastckpt  # noqa: F401  (importing it is all the wiring)
from ds_fastckpt.format.records import complete_checkpoints, scan

logger = logging.getLogger("train")
HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-dir", required=True, type=Path)
    parser.add_argument("--config", type=Path, default=HERE / "ds_config.json")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the model")
    parser.add_argument("--compare-default", action="store_true",
                        help="also time DeepSpeed's default checkpoint engine at each save")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def make_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                               torch.nn.GELU(), torch.nn.Linear(width, 64))


def checkpoint_bytes(save_dir: Path, tag: str) -> int:
    return sum(path.stat().st_size for path in (save_dir / tag).rglob("*") if path.is_file())


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def time_default_engine(engine, tag: str):
    """Seconds DeepSpeed's own engine takes for the same save into a scratch dir, and then to fsync it."""
    ours = engine.checkpoint_engine
    scratch = [tempfile.mkdtemp(prefix="default_engine_") if engine.global_rank == 0 else None]
    deepspeed.comm.broadcast_object_list(scratch, src=0)
    engine.checkpoint_engine = TorchCheckpointEngine()
    try:
        start = time.perf_counter()
        engine.save_checkpoint(scratch[0], tag=tag)
        saved = time.perf_counter() - start
        if engine.global_rank == 0:
            fsync_tree(Path(scratch[0]))
        deepspeed.comm.barrier()
        return saved, time.perf_counter() - start - saved
    finally:
        engine.checkpoint_engine = ours
        if engine.global_rank == 0:
            shutil.rmtree(scratch[0])


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = json.loads(args.config.read_text())
    model = make_model(args.width)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    rank0 = engine.global_rank == 0

    load_path, _ = engine.load_checkpoint(args.save_dir)
    resumed_from = engine.global_steps if load_path else None
    if rank0 and load_path:
        logger.info("resumed at step %d from %s", resumed_from, load_path)
    elif rank0:
        logger.info("no checkpoint in %s: starting fresh", args.save_dir)

    generator = torch.Generator().manual_seed(1234 + engine.global_rank)
    target = torch.nn.Linear(64, 64)
    saves = []
    loss = None
    while engine.global_steps < args.steps:
        batch = torch.randn(engine.train_micro_batch_size_per_gpu(), 64, generator=generator)
        with torch.no_grad():
            labels = target(batch)
        loss = torch.nn.functional.mse_loss(engine(batch.to(engine.device)), labels.to(engine.device))
        engine.backward(loss)
        engine.step()
        if engine.global_steps % args.save_every == 0:
            tag = f"global_step{engine.global_steps}"
            start = time.perf_counter()
            engine.save_checkpoint(args.save_dir, client_state={"loss": loss.item()})
            seconds = time.perf_counter() - start
            size = checkpoint_bytes(args.save_dir, tag)
            record = {"tag": tag, "bytes": size, "seconds": seconds, "gbps": size / seconds / 1e9}
            if args.compare_default:
                record["default_engine_seconds"], record["default_engine_fsync_seconds"] = \
                    time_default_engine(engine, tag)
            saves.append(record)
            if rank0:
                kept = [r.tag for r in complete_checkpoints(scan(args.save_dir))]
                logger.info("saved %s: %.1f MB in %.3f s (%.2f GB/s)%s; kept %s", tag, size / 1e6, seconds,
                            record["gbps"],
                            f"; default engine {record['default_engine_seconds']:.3f} s, not durable until "
                            f"fsync: +{record['default_engine_fsync_seconds']:.3f} s" if args.compare_default else "",
                            ", ".join(kept))
    kept = [r.tag for r in complete_checkpoints(scan(args.save_dir))] if args.save_dir.is_dir() else []
    return {"resumed_from": resumed_from, "saves": saves, "kept": kept, "final_loss": loss.item() if loss else None,
            "global_steps": engine.global_steps, "rank": engine.global_rank, "pid": os.getpid()}


if __name__ == "__main__":
    main()
