"""Writer throughput: AioFileWriter vs torch.save + fsync vs the op's raw O_DIRECT ceiling.

Each round writes the same float32 state dict once per method, in alternating
order, and deletes the file afterwards. Prints the median GB/s of each method
and the ratios, measured side by side in this one run.

torch.save computes a CRC32 of every zip record by default, on the calling
thread, at about 2 GB/s on this class of machine: by itself a cap near the
disk's speed. Both torch.save methods therefore run twice, with torch's zip
CRC32 on (torch's default) and off (``torch.serialization.set_crc32_options``),
so the writer's own cost can be told apart from the serializer's.

    python benchmarks/bench_writer.py --dir /path/on/the/disk --size-gib 1 --rounds 5
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch.serialization import set_crc32_options

from ds_fastckpt import AioFileWriter, StagingBuffer
from ds_fastckpt.native.op import load_op
from ds_fastckpt.native.writer import DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH


def make_state_dict(total_bytes: int, tensor_bytes: int = 64 << 20):
    count = max(1, total_bytes // tensor_bytes)
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(tensor_bytes // 4, generator=generator) for i in range(count)}


def state_dict_bytes(state_dict) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values())


def timed(write, path: str) -> float:
    start = time.perf_counter()
    write(path)
    elapsed = time.perf_counter() - start
    os.unlink(path)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--io-buffer-mib", type=int, default=16)
    parser.add_argument("--queue-depth", type=int, default=DEFAULT_QUEUE_DEPTH)
    parser.add_argument("--block-mib", type=int, default=DEFAULT_BLOCK_SIZE >> 20)
    args = parser.parse_args()

    block_size = args.block_mib << 20
    state_dict = make_state_dict(int(args.size_gib * (1 << 30)))
    nbytes = state_dict_bytes(state_dict)
    staging = StagingBuffer(args.io_buffer_mib << 20)
    ceiling_buffer = torch.ones(nbytes + 4096, dtype=torch.uint8)
    op = load_op()

    def aio_file_writer(crc32):

        def write(path):
            set_crc32_options(crc32)
            with AioFileWriter(path, staging=staging, queue_depth=args.queue_depth,
                               block_size=block_size) as writer:
                torch.save(state_dict, writer)

        return write

    def torch_save_fsync(crc32):

        def write(path):
            set_crc32_options(crc32)
            with open(path, "wb") as file:
                torch.save(state_dict, file)
                file.flush()
                os.fsync(file.fileno())

        return write

    def raw_ceiling(path):
        op.write_aligned(path, ceiling_buffer, nbytes, block_size, args.queue_depth, True)

    methods = {
        "AioFileWriter, crc32 off": aio_file_writer(False),
        "torch.save+fsync, crc32 off": torch_save_fsync(False),
        "AioFileWriter, crc32 on": aio_file_writer(True),
        "torch.save+fsync, crc32 on": torch_save_fsync(True),
        "raw O_DIRECT": raw_ceiling,
    }
    seconds = {name: [] for name in methods}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_writer_") as directory:
        names = list(methods)
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                seconds[name].append(timed(methods[name], os.path.join(directory, "ckpt.pt")))
            line = ", ".join(f"{name} {nbytes / seconds[name][-1] / 1e9:.2f}" for name in names)
            print(f"round {round_index + 1}/{args.rounds} GB/s: {line}", flush=True)
    set_crc32_options(True)

    median_gbps = {name: nbytes / statistics.median(values) / 1e9 for name, values in seconds.items()}
    print(f"\n{nbytes / (1 << 30):.2f} GiB state dict, {args.rounds} rounds, io_buffer_size "
          f"{args.io_buffer_mib} MiB x2, block_size {args.block_mib} MiB, queue_depth {args.queue_depth}")
    print(f"{'method':<30}{'median GB/s':>12}{'vs ceiling':>12}")
    ceiling = median_gbps["raw O_DIRECT"]
    for name, gbps in median_gbps.items():
        print(f"{name:<30}{gbps:>12.2f}{gbps / ceiling:>11.2f}x")
    for crc32 in ("off", "on"):
        ratio = median_gbps[f"AioFileWriter, crc32 {crc32}"] / median_gbps[f"torch.save+fsync, crc32 {crc32}"]
        print(f"AioFileWriter / torch.save+fsync, crc32 {crc32}: {ratio:.2f}x")
    ratio = median_gbps["AioFileWriter, crc32 off"] / median_gbps["torch.save+fsync, crc32 on"]
    print(f"AioFileWriter crc32 off / torch.save+fsync as shipped (crc32 on): {ratio:.2f}x")


if __name__ == "__main__":
    main()
