"""Cold-cache load: ds_fastckpt's O_DIRECT load vs torch.load vs the raw O_DIRECT read ceiling.

Each round drops the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``,
so run as root) before every method, in alternating order, and loads the same
checkpoint file. Prints the median GB/s of each and the ratios.

    sudo python benchmarks/bench_load.py --dir /path/on/the/disk --size-gib 1 --rounds 3
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import torch

from ds_fastckpt.engine.verified_load import load_file
from ds_fastckpt.native.reader import read_file


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("dropping the page cache needs root")

    tensor_bytes = 64 << 20
    count = max(1, int(args.size_gib * (1 << 30)) // tensor_bytes)
    state = {f"layer{i}.weight": torch.rand(tensor_bytes // 4) for i in range(count)}
    methods = {
        "ds_fastckpt load": lambda path: load_file(path, block_size=4 << 20),
        "torch.load": lambda path: torch.load(path, weights_only=True),
        "raw O_DIRECT read": lambda path: read_file(path, block_size=4 << 20),
    }
    seconds = {name: [] for name in methods}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_load_") as directory:
        path = os.path.join(directory, "ckpt.pt")
        torch.save(state, path)
        size = os.path.getsize(path)
        del state
        names = list(methods)
        for round_index in range(args.rounds):
            for name in (names if round_index % 2 == 0 else names[::-1]):
                drop_caches()
                start = time.perf_counter()
                loaded = methods[name](path)
                seconds[name].append(time.perf_counter() - start)
                del loaded
            print(f"round {round_index + 1}/{args.rounds} GB/s: " +
                  ", ".join(f"{name} {size / seconds[name][-1] / 1e9:.2f}" for name in names), flush=True)

    gbps = {name: size / statistics.median(values) / 1e9 for name, values in seconds.items()}
    print(f"\n{size / (1 << 30):.2f} GiB file, cold cache, median of {args.rounds} interleaved rounds")
    for name, value in gbps.items():
        print(f"  {name:<20} {value:6.2f} GB/s")
    print(f"ds_fastckpt load / torch.load:        {gbps['ds_fastckpt load'] / gbps['torch.load']:.2f}x")
    print(f"ds_fastckpt load / raw O_DIRECT read: {gbps['ds_fastckpt load'] / gbps['raw O_DIRECT read']:.2f}x")


if __name__ == "__main__":
    main()
