"""A 2-rank ZeRO-1 ``engine.save_checkpoint`` with one writer of the model states and with ``parallel_writers``.

Two ranks on CPU (torchrun, gloo), an fp32 model of N x Linear(width, width)
trained one step with AdamW (``--size`` picks N so that a save writes about
that much: 4 bytes per parameter of model states, 12 of optimizer state split
between the ranks). Each rank holds two engines of the same model, saving
into their own save_dirs with ``keep_last: 2`` (recycling, the default):

- ``one writer``: ``"parallel_writers": "off"``: rank 0 writes the model
  states alone, each rank its optimizer partition;
- ``parallel_writers all``: both ranks write shares of the model states.

Every round saves once with each, in an order that alternates (``measure.
interleaved``); after warm-up saves, so that every timed save rotates and
writes over a spare. A save is timed on rank 0 from a barrier before
``save_checkpoint`` until it returns (DeepSpeed ends it with a barrier, so
both ranks are done). Bytes per rank are ``write_bytes`` of /proc/self/io
around the save; balance is the smaller rank's over the larger's.

    python benchmarks/bench_parallel.py --dir /path/on/the/disk --rounds 5 [--size 1GiB] [--width 2048]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE = "one writer"
ALL = "parallel_writers all"
KEEP = 2
WARM_UP_SAVES = KEEP + 1
BYTES_PER_PARAMETER = 16  # fp32 weight, and the fp32 master partition + both Adam moments across the ranks


def write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no write_bytes")


def worker(args) -> None:
    """One rank: interleaved saves with both engines; rank 0 prints the table."""
    import torch.distributed as dist
    from bench_save import make_engine  # benchmarks/bench_save.py: scripts import their siblings

    from ds_fastckpt.cli.measure import format_ratio, interleaved, medians, ratios

    layers = max(1, round(args.size / BYTES_PER_PARAMETER / (args.width * args.width + args.width)))
    engines = {name: make_engine(layers, args.width, {"engine": "fast_aio", "fast_aio": {
        "keep_last": KEEP, "parallel_writers": mode}}) for name, mode in ((ONE, "off"), (ALL, "all"))}
    rank, step = dist.get_rank(), {name: 0 for name in engines}
    written = {name: [] for name in engines}

    def save(name: str) -> float:
        step[name] += 1
        dist.barrier()
        before, started = write_bytes(), time.perf_counter()
        engines[name].save_checkpoint(args.dir / name.replace(" ", "_"), tag=f"step{step[name]}")
        seconds = time.perf_counter() - started
        written[name].append(write_bytes() - before)
        return seconds

    for name in engines:
        for _ in range(WARM_UP_SAVES):
            save(name)
        written[name].clear()
    samples = interleaved({name: (lambda _round, name=name: save(name)) for name in engines}, args.rounds)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {name: statistics.median(values) for name, values in written.items()})
    for engine in engines.values():
        engine.destroy()
    if rank != 0:
        return
    seconds = medians(samples)
    speed = ratios({name: 1 / value for name, value in seconds.items()}, ONE)
    total = {name: sum(rank_bytes[name] for rank_bytes in per_rank) for name in engines}
    print(f"{layers} x Linear({args.width}, {args.width}) fp32 + AdamW, ZeRO-1, 2 ranks on CPU (gloo); "
          f"{args.rounds} interleaved rounds, medians; keep_last {KEEP}, recycling")
    print(f"{'method':<22} {'save s':>8} {'GB/s':>6} {'vs one writer':>14} {'rank 0 MB':>10} {'rank 1 MB':>10} "
          f"{'balance':>8}")
    for name in engines:
        ranks = [rank_bytes[name] for rank_bytes in per_rank]
        print(f"{name:<22} {seconds[name]:>8.3f} {total[name] / seconds[name] / 1e9:>6.2f} "
              f"{format_ratio(speed[name]):>14} {ranks[0] / 1e6:>10.1f} {ranks[1] / 1e6:>10.1f} "
              f"{min(ranks) / max(ranks):>8.2f}")
    print("samples (s): " + "; ".join(f"{name}: " + ", ".join(f"{value:.3f}" for value in values)
                                       for name, values in samples.items()))


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ds_fastckpt.cli.arguments import integer_at_least
    from ds_fastckpt.cli.bench import parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the disk to save to (default: a new temp dir under the current one)")
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="bytes per save, about (default 1GiB)")
    parser.add_argument("--width", type=integer_at_least(8), default=2048, help="Linear width (default 2048)")
    parser.add_argument("--rounds", type=integer_at_least(1), default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_parallel.", dir=args.dir or Path.cwd()))
    env = {name: value for name, value in os.environ.items()
           if name not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
                        __file__, "--worker", "--dir", str(root), "--size", str(args.size), "--width",
                        str(args.width), "--rounds", str(args.rounds)], env=env, check=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
