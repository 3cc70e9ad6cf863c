"""Cold-cache load: ds_fastckpt's O_DIRECT load vs torch.load vs the raw O_DIRECT read ceiling.

Each round drops the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``,
so run as root) before every method, in an order that rotates every round
(``ds_fastckpt.cli.measure.interleaved``), and loads the same checkpoint file.
Prints the median GB/s of each and the ratios.

    sudo python benchmarks/bench_load.py --dir /path/on/the/disk --size-gib 1 --rounds 3
"""

import argparse
import os
import subprocess
import tempfile

import torch

from ds_fastckpt.cli.measure import format_ratio, interleaved, medians, timed
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
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_load_") as directory:
        path = os.path.join(directory, "ckpt.pt")
        torch.save(state, path)
        size = os.path.getsize(path)
        del state

        def cold(load):
            def run_once(_round_index):
                drop_caches()  # not timed
                return timed(lambda: load(path))
            return run_once

        def progress(round_index, seconds):
            print(f"round {round_index + 1}/{args.rounds} GB/s: " +
                  ", ".join(f"{name} {size / values[-1] / 1e9:.2f}" for name, values in seconds.items()), flush=True)

        seconds = interleaved({name: cold(load) for name, load in methods.items()}, args.rounds, progress)

    gbps = {name: size / median / 1e9 for name, median in medians(seconds).items()}
    print(f"\n{size / (1 << 30):.2f} GiB file, cold cache, median of {args.rounds} interleaved rounds")
    for name, value in gbps.items():
        print(f"  {name:<20} {value:6.2f} GB/s")
    fast = gbps["ds_fastckpt load"]
    print(f"ds_fastckpt load / torch.load:        {format_ratio(fast / gbps['torch.load'])}")
    print(f"ds_fastckpt load / raw O_DIRECT read: {format_ratio(fast / gbps['raw O_DIRECT read'])}")


if __name__ == "__main__":
    main()
