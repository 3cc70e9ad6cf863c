"""Training-step cost of checkpointing every step: no saves vs sync fast_aio vs async fast_aio.

A CPU training loop whose forward + backward takes about as long as writing
its checkpoint runs three ways, interleaved round by round in one process:
without saves, saving every step synchronously, and saving every step with
``"async": true``, in an order that rotates every round
(``ds_fastckpt.cli.measure.interleaved``). Prints the median step time of
each, the save overhead (step time minus the no-save step time) of sync and
async, and their ratio.

Training runs on one thread (``torch.set_num_threads(1)``), leaving the
other core to the writer, as a GPU host leaves its CPUs to it; ``--threads
2`` trains on both cores instead, so every CPU second the writer spends is
taken from training. ``--snapshot`` saves async with ``"snapshot": true``:
each save copies the state before it returns.

    python benchmarks/bench_async.py --dir /path/on/the/disk [--threads 2] [--snapshot]
"""

import argparse
import importlib
import os
import statistics
import tempfile
import time

import torch
from single_process import world_of_one  # benchmarks/single_process.py: scripts import their siblings

from ds_fastckpt.cli.measure import format_ratio, interleaved, medians
from ds_fastckpt.format.records import complete_checkpoints, scan


def make_engine(width: int, async_save: bool, snapshot: bool = False):
    import deepspeed

    importlib.import_module("ds_fastckpt")  # importing it registers the fast_aio engine with DeepSpeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))
    config = {
        "train_micro_batch_size_per_gpu": 64,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "checkpoint": {"engine": "fast_aio",
                       "fast_aio": {"keep_last": 2, "async": async_save, "snapshot": snapshot}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def run_steps(engine, steps: int, save_dir, width: int):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch = torch.randn(64, width)
        loss = engine(batch).pow(2).mean()
        engine.backward(loss)
        engine.step()
        if save_dir is not None:
            engine.save_checkpoint(save_dir)
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="directory on the disk to save to (default: a temp dir)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="steps per mode per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads training uses (default 1)")
    parser.add_argument("--snapshot", action="store_true", help="async saves copy the state first")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    world_of_one()
    sync_engine = make_engine(args.width, async_save=False)
    async_engine = make_engine(args.width, async_save=True, snapshot=args.snapshot)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_async_") as root:
        # Each run's step times but the first: the first step of a run pays for the mode switch.
        runs = {
            "no saves": lambda _: run_steps(sync_engine, args.steps, None, args.width)[1:],
            "sync saves": lambda _: run_steps(sync_engine, args.steps, os.path.join(root, "sync"), args.width)[1:],
            "async saves": lambda _: run_steps(async_engine, args.steps, os.path.join(root, "async"),
                                               args.width)[1:],
        }

        def progress(round_index, step_times):
            print(f"round {round_index + 1}/{args.rounds}: " +
                  ", ".join(f"{name} {statistics.median(times) * 1e3:.1f} ms" for name, times in step_times.items()),
                  flush=True)

        step_times = interleaved(runs, args.rounds, progress)
        async_engine.destroy()
        size = complete_checkpoints(scan(os.path.join(root, "sync")))[-1].manifest.total_bytes

    median = medians(step_times)
    sync_overhead = median["sync saves"] - median["no saves"]
    async_overhead = median["async saves"] - median["no saves"]
    print(f"\ncheckpoint {size / 1e6:.0f} MB per save, {args.rounds} rounds x {args.steps} steps, training on "
          f"{args.threads} thread(s), async {'with' if args.snapshot else 'without'} snapshot, median step time:")
    for name, seconds in median.items():
        print(f"  {name:<12} {seconds * 1e3:8.1f} ms")
    print(f"save overhead per step: sync {sync_overhead * 1e3:.1f} ms, async {async_overhead * 1e3:.1f} ms")
    print(f"async overhead / sync overhead: {format_ratio(async_overhead / sync_overhead)}")


if __name__ == "__main__":
    main()
