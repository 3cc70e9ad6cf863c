"""``ds-fastckpt bench``: write throughput of a directory's disk, several ways side by side in one run.

Methods, run once per round in an order that rotates every round (``ds_fastckpt.cli.measure``), each
file deleted after it is timed: the op's raw O_DIRECT ceiling (one aligned buffer, no staging copy, the
same block size and queue depth), AioFileWriter as the fast_aio engine uses it (one staging buffer
reused across files, torch's zip CRC32 off), ``torch.save`` + fsync as shipped (CRC32 on), and torch's
DCP ``save`` with ``sync_files=True``. Prints the median GB/s of each and its ratio to the ceiling and
to ``torch.save`` + fsync, all measured in this run.

``torch.save`` computes a CRC32 of every zip record on the calling thread (torch's default), at about
2 GB/s on a 2-core machine: by itself a cap near a disk's speed. ``--crc32-both`` runs AioFileWriter and
``torch.save`` + fsync twice each, with that CRC32 off and on, so the writer's own cost can be told
apart from the serializer's.
"""

import argparse
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from ds_fastckpt.cli.arguments import integer_at_least
from ds_fastckpt.cli.measure import format_ratio, interleaved, medians, ratios, timed
from ds_fastckpt.cli.output import say
from ds_fastckpt.native.op import load_op
from ds_fastckpt.native.staging import StagingBuffer
from ds_fastckpt.native.tuning import DEFAULT_IO_BUFFER_SIZE, DEFAULT_TUNING, check_io_buffer_size, check_tuning
from ds_fastckpt.native.writer import AioFileWriter, torch_zip_crc32

_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}

_CEILING = "raw O_DIRECT"
_DCP = "dcp.save sync_files"


def parse_size(text: str) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"2GB"`` or a number of bytes, at least 1 MiB (a state dict size)."""
    size = _parse_bytes(text)
    if size < 1 << 20:
        raise argparse.ArgumentTypeError(f"size {text!r} is not allowed: use at least 1MiB")
    return size


def _parse_bytes(text: str) -> int:
    """``"1GiB"``, ``"512KiB"``, ``"2GB"`` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r} is not allowed: use e.g. 1GiB, 512MiB, 2GB or bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def add_arguments(parser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("."), help="directory on the disk to measure")
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="state dict size (default 1GiB)")
    parser.add_argument("--rounds", type=integer_at_least(1), default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--crc32-both", action="store_true",
                        help="run AioFileWriter and torch.save+fsync with torch's zip CRC32 off and on")
    parser.add_argument("--io-buffer", type=_parse_bytes, default=DEFAULT_IO_BUFFER_SIZE,
                        help=f"AioFileWriter's staging half (x2) (default {DEFAULT_IO_BUFFER_SIZE >> 20}MiB)")
    parser.add_argument("--block-size", type=_parse_bytes, default=DEFAULT_TUNING.block_size,
                        help=f"bytes per libaio request (default {DEFAULT_TUNING.block_size >> 20}MiB)")
    parser.add_argument("--queue-depth", type=int, default=DEFAULT_TUNING.queue_depth,
                        help=f"libaio requests in flight (default {DEFAULT_TUNING.queue_depth})")
    parser.add_argument("--plot", type=Path, help="write a bar chart (PNG) here; needs matplotlib")


def _state_dict(nbytes: int):
    tensor_bytes = min(nbytes, 64 << 20)
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(tensor_bytes // 4, generator=generator)
            for i in range(max(1, nbytes // tensor_bytes))}


def _torch_save_baseline(crc32_both: bool) -> str:
    """The name of ``torch.save`` + fsync as shipped (torch's zip CRC32 on) among the methods."""
    return "torch.save+fsync, crc32 on" if crc32_both else "torch.save+fsync"


def _writers(state, nbytes: int, args) -> Dict[str, Callable[[Path], None]]:
    """name -> a function writing the state dict (or, for the ceiling, ``nbytes``) durably to a path."""
    op = load_op()
    ceiling_buffer = torch.ones(nbytes + 4096, dtype=torch.uint8)
    staging = StagingBuffer(args.io_buffer)

    def raw(path):
        op.write_aligned(str(path), ceiling_buffer, nbytes // 4096 * 4096, args.block_size, args.queue_depth, True)

    def aio(crc32: bool):
        def write(path):
            with torch_zip_crc32(crc32), AioFileWriter(path, staging=staging, block_size=args.block_size,
                                                       queue_depth=args.queue_depth) as writer:
                torch.save(state, writer)
        return write

    def torch_save(crc32: bool):
        def write(path):
            with torch_zip_crc32(crc32), open(path, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
        return write

    # Imported here, not inside dcp(): the first import takes seconds and is not part of a save.
    from torch.distributed.checkpoint import FileSystemWriter, save

    def dcp(path):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, on purpose
            save(state, storage_writer=FileSystemWriter(str(path), sync_files=True))

    if not args.crc32_both:
        return {_CEILING: raw, "AioFileWriter": aio(False), "torch.save+fsync": torch_save(True), _DCP: dcp}
    return {_CEILING: raw,
            "AioFileWriter, crc32 off": aio(False), "torch.save+fsync, crc32 off": torch_save(False),
            "AioFileWriter, crc32 on": aio(True), "torch.save+fsync, crc32 on": torch_save(True),
            _DCP: dcp}


def write_throughput(directory: Path, args, report=say) -> Tuple[Dict[str, float], int]:
    """Median GB/s of each method, keyed by method name, and the bytes each wrote.

    Args:
        directory: where the scratch directory (removed at the end) is made.
        args: the parsed ``bench`` arguments (size, rounds, crc32_both, io_buffer, block_size, queue_depth).
        report: called with one progress line per round.
    """
    state = _state_dict(args.size)
    nbytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    writers = _writers(state, nbytes, args)
    with tempfile.TemporaryDirectory(dir=directory, prefix="ds_fastckpt_bench_") as scratch:
        target = Path(scratch) / "ckpt"

        def method(write):
            def run_once(_round_index: int) -> float:
                seconds = timed(lambda: write(target))
                shutil.rmtree(target) if target.is_dir() else target.unlink()  # not timed
                return seconds
            return run_once

        def progress(round_index: int, samples: Dict[str, List[float]]) -> None:
            report(f"round {round_index + 1}/{args.rounds}: " +
                   ", ".join(f"{name} {nbytes / values[-1] / 1e9:.2f} GB/s" for name, values in samples.items()))

        samples = interleaved({name: method(write) for name, write in writers.items()}, args.rounds, progress)
    return {name: nbytes / seconds / 1e9 for name, seconds in medians(samples).items()}, nbytes


def run(args) -> int:
    if not args.dir.is_dir():
        raise FileNotFoundError(2, "not a directory", str(args.dir))
    check_tuning(block_size=args.block_size, queue_depth=args.queue_depth)  # before minutes of set-up
    check_io_buffer_size(args.io_buffer)
    gbps, nbytes = write_throughput(args.dir, args)
    baseline = _torch_save_baseline(args.crc32_both)
    vs_ceiling, vs_torch_save = ratios(gbps, _CEILING), ratios(gbps, baseline)
    say(f"\n{nbytes / (1 << 30):.2f} GiB state dict in {args.dir}, median of {args.rounds} interleaved rounds; "
        f"io_buffer {args.io_buffer >> 20} MiB x2, block_size {args.block_size >> 10} KiB, "
        f"queue_depth {args.queue_depth}")
    width = max(len(name) for name in gbps) + 2
    say(f"{'method':<{width}}{'GB/s':>8}{'vs ceiling':>12}{'vs torch.save':>15}")
    for name, value in gbps.items():
        say(f"{name:<{width}}{value:>8.2f}{format_ratio(vs_ceiling[name]):>12}"
            f"{format_ratio(vs_torch_save[name]):>15}")
    if args.crc32_both:
        for crc32 in ("off", "on"):
            ratio = gbps[f"AioFileWriter, crc32 {crc32}"] / gbps[f"torch.save+fsync, crc32 {crc32}"]
            say(f"AioFileWriter / torch.save+fsync, crc32 {crc32}: {format_ratio(ratio)}")
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

    colours = {_CEILING: "#888888", "AioFileWriter": "#2a7ab9", "torch.save+fsync": "#d9822b", _DCP: "#6a9f58"}
    figure, axes = pyplot.subplots(figsize=(max(7, 1.4 * len(gbps)), 3.5))
    bars = axes.bar([name.replace(", ", "\n") for name in gbps], list(gbps.values()),
                    color=[colours[name.split(",")[0]] for name in gbps])
    axes.bar_label(bars, fmt="%.2f")
    axes.set_ylim(0, max(gbps.values()) * 1.15)
    axes.set_ylabel("GB/s (median, durable)")
    axes.set_title(f"Writing a {nbytes / (1 << 30):.2f} GiB state dict")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
