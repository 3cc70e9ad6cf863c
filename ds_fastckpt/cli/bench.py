"""``ds-fastckpt bench``: write throughput of a directory's disk, four ways side by side.

Methods, alternating order each round, each file deleted after its round:
the op's raw O_DIRECT ceiling (one aligned buffer, no staging copy),
AioFileWriter as the fast_aio engine uses it (torch's zip CRC32 off),
``torch.save`` + fsync as shipped (CRC32 on), and torch's DCP ``save`` with
``sync_files=True``.
"""

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ds_fastckpt.cli.output import say
from ds_fastckpt.native.op import load_op
from ds_fastckpt.native.writer import DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH, AioFileWriter, torch_zip_crc32

_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"2GB"`` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r} is not allowed: use e.g. 1GiB, 512MiB, 2GB or bytes")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1 << 20:
        raise argparse.ArgumentTypeError(f"size {text!r} is not allowed: use at least 1MiB")
    return size


def add_arguments(parser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("."), help="directory on the disk to measure")
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="state dict size (default 1GiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot", type=Path, help="write a bar chart (PNG) here; needs matplotlib")


def _state_dict(nbytes: int):
    tensor_bytes = min(nbytes, 64 << 20)
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(tensor_bytes // 4, generator=generator)
            for i in range(max(1, nbytes // tensor_bytes))}


def _methods(state, nbytes: int):
    op = load_op()
    ceiling_buffer = torch.ones(nbytes + 4096, dtype=torch.uint8)

    def raw(path):
        op.write_aligned(str(path), ceiling_buffer, nbytes // 4096 * 4096, DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH,
                         True)

    def aio(path):
        with torch_zip_crc32(False), AioFileWriter(path) as writer:
            torch.save(state, writer)

    def torch_save(path):
        with open(path, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())

    def dcp(path):
        from torch.distributed.checkpoint import FileSystemWriter, save

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, on purpose
            save(state, storage_writer=FileSystemWriter(str(path), sync_files=True))

    return {"raw O_DIRECT": raw, "AioFileWriter": aio, "torch.save+fsync": torch_save, "dcp.save sync_files": dcp}


def measure(directory: Path, nbytes: int, rounds: int, report=say):
    """Median GB/s of each method, keyed by method name."""
    state = _state_dict(nbytes)
    nbytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    methods = _methods(state, nbytes)
    seconds = {name: [] for name in methods}
    with tempfile.TemporaryDirectory(dir=directory, prefix="ds_fastckpt_bench_") as scratch:
        names = list(methods)
        for round_index in range(rounds):
            for name in (names if round_index % 2 == 0 else names[::-1]):
                target = Path(scratch) / "ckpt"
                start = time.perf_counter()
                methods[name](target)
                seconds[name].append(time.perf_counter() - start)
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            report(f"round {round_index + 1}/{rounds}: " +
                   ", ".join(f"{name} {nbytes / seconds[name][-1] / 1e9:.2f} GB/s" for name in names))
    return {name: nbytes / statistics.median(values) / 1e9 for name, values in seconds.items()}, nbytes


def run(args) -> int:
    if not args.dir.is_dir():
        raise FileNotFoundError(2, "not a directory", str(args.dir))
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds} is not allowed: use 1 or more")
    gbps, nbytes = measure(args.dir, args.size, args.rounds)
    ceiling, baseline = gbps["raw O_DIRECT"], gbps["torch.save+fsync"]
    say(f"\n{nbytes / (1 << 30):.2f} GiB state dict in {args.dir}, median of {args.rounds} interleaved rounds")
    say(f"{'method':<22}{'GB/s':>8}{'vs ceiling':>12}{'vs torch.save':>15}")
    for name, value in gbps.items():
        say(f"{name:<22}{value:>8.2f}{value / ceiling:>11.2f}x{value / baseline:>14.2f}x")
    if args.plot is not None:
        _plot(gbps, nbytes, args.plot)
        say(f"plot written to {args.plot}")
    return 0


def _plot(gbps, nbytes: int, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 3.5))
    bars = axes.bar(list(gbps), list(gbps.values()), color=["#888888", "#2a7ab9", "#d9822b", "#6a9f58"])
    axes.bar_label(bars, fmt="%.2f")
    axes.set_ylim(0, max(gbps.values()) * 1.15)
    axes.set_ylabel("GB/s (median, durable)")
    axes.set_title(f"Writing a {nbytes / (1 << 30):.2f} GiB state dict")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
