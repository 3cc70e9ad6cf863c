"""Saving a GPU training state on one CUDA card: GPU-blocked time and time to durable, several ways side by side.

The state is what a mixed-precision Adam job checkpoints: bf16 weights and, per
parameter, fp32 master weight, exp_avg and exp_avg_sq, all on the GPU
(14 bytes per parameter), in tensors of at most 2**26 parameters. For each
``--sizes`` entry the methods below run once per round, in an order that
rotates every round (``ds_fastckpt.cli.measure``), each file removed after it
is timed:

- fast_aio sync: ``save_layout_first`` into an ``AioFileWriter`` with fsync,
  one pinned ``StagingBuffer`` and one ``DeviceCopier`` reused across rounds;
  the GPU's state may change only once it returns.
- fast_aio async: ``lay_out(state).snapshot()`` (DMA into pinned host memory)
  is the GPU-blocked time; the snapshot is then written on a writer thread,
  and the time until that file is durable is reported too.
- D2H copy: every tensor copied by DMA into pinned host memory allocated
  beforehand: the floor for any GPU-blocked time (the bar for fast_aio async
  is at most 1.2x this).
- DeepSpeed FastCheckpointEngine: DeepSpeed's FastPersist engine, built as
  ``"checkpoint": {"writer": {"type": "fast"}}`` builds it, with its defaults
  (FastFileWriter, 64 MiB pinned double buffer, DeepSpeed's aio defaults),
  torch's zip CRC32 as shipped (on).
- torch.save+fsync: into a plain file, CRC32 as shipped (on).
- dcp.async_save: torch DCP with a pinned-memory stager reused across rounds
  (staging in the call, upload on DCP's thread), ``FileSystemWriter`` with
  ``sync_files=True``; the call's return is its GPU-blocked time.

Prints, per size, the median seconds to durable, GB/s, the median GPU-blocked
seconds, and ratios against FastCheckpointEngine (throughput) and against the
D2H copy (GPU-blocked time), all measured in this run. ``CPU s/GB`` is the
median CPU time (user + system) of this whole process, every thread of it,
until the save is durable, per GB of state (``Stopwatch``); ``blocked CPU
s/GB`` the same over the GPU-blocked part (the same as ``CPU s/GB`` where
that is the whole call). A footnote gives the median share of each fast_aio
sync file the writer sent to disk from the memory its bytes were DMAed into,
uncopied (``AioFileWriter.bytes_in_place``). A method that fails is
reported with its error and left out of the ratios. With ``--time-limit`` no
save starts after that many seconds, and the tables show the saves that ran.

    python benchmarks/bench_gpu.py --sizes 1GiB,8GiB --rounds 3 [--dir /path/on/the/disk]

Without a CUDA device it prints one line and exits 0.
"""

import argparse
import concurrent.futures
import gc
import inspect
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

SYNC = "fast_aio sync"
ASYNC = "fast_aio async"
D2H = "D2H copy (pinned)"
FCE = "DeepSpeed FastCheckpointEngine"
TORCH_SAVE = "torch.save+fsync"
DCP = "dcp.async_save (pinned)"
ORDER = [SYNC, ASYNC, D2H, FCE, TORCH_SAVE, DCP]  # of the table and of round 0

PARAMS_PER_TENSOR = 1 << 26
BYTES_PER_PARAM = 2 + 3 * 4  # bf16 weight; fp32 master, exp_avg, exp_avg_sq
BLOCKED_BAR = 1.2  # fast_aio async's GPU-blocked time may be at most this times the D2H copy


def gpu_state(nbytes: int, device: torch.device) -> dict:
    """A mixed-precision Adam checkpoint of about ``nbytes`` bytes, every large tensor on ``device``."""
    params = max(1, nbytes // BYTES_PER_PARAM)
    generator = torch.Generator(device=device).manual_seed(0)
    module, state, master = {}, {}, []
    for index, start in enumerate(range(0, params, PARAMS_PER_TENSOR)):
        count = min(PARAMS_PER_TENSOR, params - start)
        fp32 = torch.randn(count, generator=generator, device=device)
        module[f"layers.{index}.weight"] = fp32.to(torch.bfloat16)
        master.append(fp32)
        state[f"param{index}"] = {"step": torch.tensor(100.0),
                                  "exp_avg": torch.randn(count, generator=generator, device=device).mul_(1e-3),
                                  "exp_avg_sq": torch.rand(count, generator=generator, device=device).mul_(1e-6)}
    return {"module": module, "optimizer": {"state": state, "fp32_master": master,
                                            "param_groups": [{"lr": 1e-4, "params": sorted(state)}]},
            "global_steps": 100}


def tensors_of(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [tensor for value in obj.values() for tensor in tensors_of(value)]
    if isinstance(obj, (list, tuple)):
        return [tensor for value in obj for tensor in tensors_of(value)]
    return []


class Stopwatch:
    """Wall seconds and CPU seconds of this whole process since it was made.

    The calling thread's CPU time would leave out the work a save hands to other threads: the op's I/O thread
    (CRC-32C, submitting and reaping), the writer thread here, DeepSpeed's aio threads, DCP's upload thread and
    torch's intra-op threads. ``time.process_time`` is user + system time summed over every thread of the process,
    ended ones included; every method runs in this process. Not in it: the kernel's own threads (writeback,
    the disk's completions) and the GPU's copy engines.
    """

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> Tuple[float, float]:
        """(wall seconds, CPU seconds) since the start."""
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class Methods:
    """The methods of one size: each runs one save and returns the seconds until it is durable.

    Each method's first failure is kept and the method is skipped from then on; so is every method once the
    time limit has passed. A method times its call with a ``Stopwatch`` and ends it with ``stop``, which keeps the
    process's CPU seconds too; one whose GPU-blocked part ends before the save is durable marks that with ``block``.
    """

    def __init__(self, target: Path, deadline: float):
        self.target = target
        self.deadline = deadline
        self.methods: Dict[str, Callable[[Path], float]] = {}
        self.blocked: Dict[str, List[float]] = {}  # GPU-blocked seconds, where they differ from the total
        self.cpu: Dict[str, List[float]] = {}  # the process's CPU seconds until durable
        self.blocked_cpu: Dict[str, List[float]] = {}  # and over the GPU-blocked part, where that differs
        self.in_place: List[float] = []  # fast_aio sync: share of the file's bytes written from their own memory
        self.failed: Dict[str, str] = {}
        self.skipped: Dict[str, str] = {}

    def add(self, name: str, run: Callable[[Path], float]) -> None:
        self.methods[name] = run

    def block(self, name: str, watch: Stopwatch) -> None:
        """Marks the end of ``name``'s GPU-blocked part: from here on the GPU's state may change."""
        seconds, cpu = watch.read()
        self.blocked.setdefault(name, []).append(seconds)
        self.blocked_cpu.setdefault(name, []).append(cpu)

    def stop(self, name: str, watch: Stopwatch) -> float:
        """Ends ``name``'s timed call, its save now durable: keeps the CPU seconds, returns the wall seconds."""
        seconds, cpu = watch.read()
        self.cpu.setdefault(name, []).append(cpu)
        return seconds

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        print(f"{name}: skipped: {reason}", flush=True)

    def guarded(self) -> Dict[str, Callable[[int], List[float]]]:
        """name -> the method as ``interleaved`` calls it: no sample once it failed or past the deadline."""

        def wrap(name: str, run: Callable[[Path], float]) -> Callable[[int], List[float]]:
            def once(_round_index: int) -> List[float]:
                if name in self.failed or (self.deadline and time.monotonic() > self.deadline):
                    return []
                try:
                    return [run(self.target)]
                except Exception as error:  # reported in the table; the other methods go on
                    self.failed[name] = f"{type(error).__name__}: {error}"
                    print(f"{name}: failed: {self.failed[name]}", flush=True)
                    return []
                finally:
                    remove(self.target)  # not timed

            return once

        return {name: wrap(name, self.methods[name]) for name in ORDER if name in self.methods}


def add_fast_aio(methods: Methods, state: dict, device: torch.device, pool) -> None:
    from ds_fastckpt.native.device_copy import DeviceCopier
    from ds_fastckpt.native.layout_save import lay_out, save_layout_first
    from ds_fastckpt.native.op import load_op
    from ds_fastckpt.native.staging import StagingBuffer
    from ds_fastckpt.native.tuning import DEFAULT_IO_BUFFER_SIZE
    from ds_fastckpt.native.writer import AioFileWriter, torch_zip_crc32

    try:
        load_op()
    except Exception as error:  # the other methods are still worth measuring
        for name in (SYNC, ASYNC):
            methods.skip(name, f"the native op is not available: {type(error).__name__}: {error}")
        return
    staging = StagingBuffer(DEFAULT_IO_BUFFER_SIZE)  # pinned here: made once, as the engine does
    copiers = {device: DeviceCopier(device)}

    def sync(path: Path) -> float:
        watch = Stopwatch()
        with torch_zip_crc32(False), AioFileWriter(path, staging=staging, fsync=True) as writer:
            save_layout_first(state, writer, copiers)
        seconds = methods.stop(SYNC, watch)
        methods.in_place.append(writer.bytes_in_place / writer.bytes_written)
        return seconds

    def write_snapshot(snapshot, path: Path) -> None:
        with AioFileWriter(path, staging=staging, fsync=True) as writer:
            snapshot.write_to(writer)

    def asynchronous(path: Path) -> float:
        watch = Stopwatch()
        with torch_zip_crc32(False):
            snapshot = lay_out(state).snapshot()
        methods.block(ASYNC, watch)
        pool.submit(write_snapshot, snapshot, path).result()
        return methods.stop(ASYNC, watch)

    with torch_zip_crc32(False):
        lay_out(state).snapshot()  # untimed: fills torch's pinned host cache, which every later snapshot reuses
    methods.add(SYNC, sync)
    methods.add(ASYNC, asynchronous)


def add_d2h(methods: Methods, state: dict) -> None:
    sources = [tensor for tensor in tensors_of(state) if tensor.is_cuda]
    destinations = [torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True) for tensor in sources]

    def d2h(_path: Path) -> float:
        torch.cuda.synchronize()
        watch = Stopwatch()
        for destination, source in zip(destinations, sources):
            destination.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        return methods.stop(D2H, watch)

    methods.add(D2H, d2h)


def fast_checkpoint_engine():
    """DeepSpeed's FastCheckpointEngine with its default writer settings, as ``create_checkpoint_engine`` makes it.

    ``config_params`` carries the two attributes the engine reads from a ``DeepSpeedConfig``; the data-parallel
    writer config is a world of one.
    """
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.fast_checkpoint_engine import FastCheckpointEngine
    from deepspeed.runtime.model_checkpointing.config import get_checkpoint_config
    from deepspeed.runtime.model_checkpointing.data_parallel_writer_factory import DataParallelWriterConfig
    from deepspeed.runtime.swap_tensor.aio_config import get_aio_config

    param_dict = {"checkpoint": {"writer": {"type": "fast"}}}
    config = SimpleNamespace(checkpoint_config=get_checkpoint_config(param_dict), aio_config=get_aio_config(param_dict))
    writer_config = DataParallelWriterConfig(world_size=1, rank=0, global_rank=0, local_rank=0, pure_dp=True)
    return FastCheckpointEngine(config, writer_config, optimize_dp_state=False)


def add_fast_checkpoint_engine(methods: Methods, state: dict, skip_reason: str) -> None:
    if skip_reason:
        methods.skip(FCE, skip_reason)
        return
    try:
        engine = fast_checkpoint_engine()
    except Exception as error:  # e.g. DeepSpeed's async_io op cannot be built here
        methods.skip(FCE, f"cannot build it: {type(error).__name__}: {error}")
        return

    def save(path: Path) -> float:
        watch = Stopwatch()
        engine.save(state, str(path))  # closes the FastFileWriter, which fsyncs
        return methods.stop(FCE, watch)

    methods.add(FCE, save)


def add_torch_save(methods: Methods, state: dict) -> None:
    def save(path: Path) -> float:
        watch = Stopwatch()
        with open(path, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        return methods.stop(TORCH_SAVE, watch)

    methods.add(TORCH_SAVE, save)


def dcp_stager():
    """A stager copying into pinned host memory it keeps across saves, in the ``async_save`` call itself."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        return DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                            use_async_staging=False, use_non_blocking_copy=True))
    except (ImportError, TypeError):  # a torch before DefaultStager, or with other StagingOptions
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        return BlockingAsyncStager(cache_staged_state_dict=True)  # a pinned copy, kept across saves


def world_of_one() -> None:
    """A gloo + nccl process group of one, for a DCP whose ``async_save`` has no ``no_dist``."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def add_dcp(methods: Methods, state: dict) -> List[object]:
    """Adds DCP's async save; returns what must be closed after the size is done."""
    try:
        from torch.distributed.checkpoint import FileSystemWriter, async_save

        stager = dcp_stager()
        options = {}
        parameters = inspect.signature(async_save).parameters
        if "async_stager" in parameters:
            options["async_stager"] = stager
        if "no_dist" in parameters:
            options["no_dist"] = True
        else:
            world_of_one()
        staged = stager.stage(state)  # untimed: allocates the pinned copies the stager keeps for every save
        if isinstance(staged, concurrent.futures.Future):
            staged.result()
        del staged
    except Exception as error:
        methods.skip(DCP, f"cannot set it up: {type(error).__name__}: {error}")
        return []

    def save(path: Path) -> float:
        watch = Stopwatch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled": one process, on purpose
            response = async_save(state, storage_writer=FileSystemWriter(str(path), sync_files=True), **options)
            methods.block(DCP, watch)
            upload = getattr(response, "upload_completion", response)  # AsyncSaveResponse or a Future
            upload.result()
        return methods.stop(DCP, watch)

    methods.add(DCP, save)
    return [stager]


def report(nbytes: int, samples: Dict[str, List[float]], methods: Methods, rounds: int, directory: Path) -> None:
    from ds_fastckpt.cli.measure import format_ratio, medians, ratios

    measured = {name: values for name, values in samples.items() if values}
    seconds = medians(measured)
    blocked = medians({name: methods.blocked.get(name) or samples[name] for name in measured})
    gbps = {name: nbytes / value / 1e9 for name, value in seconds.items()}
    cpu = medians({name: methods.cpu[name] for name in measured})
    blocked_cpu = medians({name: methods.blocked_cpu.get(name) or methods.cpu[name] for name in measured})
    per_gb = 1e9 / nbytes
    vs_fce = ratios(gbps, FCE) if FCE in gbps else {}
    vs_d2h = ratios(blocked, D2H) if D2H in blocked else {}
    print(f"\n{nbytes / (1 << 30):.2f} GiB state (bf16 weights; fp32 master, exp_avg, exp_avg_sq) on "
          f"{torch.cuda.get_device_name()}, writing to {directory}; median of up to {rounds} interleaved rounds")
    width = max(len(name) for name in [*samples, *methods.skipped]) + 2
    print(f"{'method':<{width}}{'n':>3}{'seconds':>10}{'GB/s':>9}{'CPU s/GB':>10}{'GPU-blocked s':>15}"
          f"{'blocked CPU s/GB':>18}{'GB/s vs FCE':>13}{'blocked vs D2H':>16}")
    for name in samples:
        if name not in measured:
            why = f"failed: {methods.failed[name]}" if name in methods.failed else "no save started before --time-limit"
            print(f"{name:<{width}}  {why}")
            continue
        fce = format_ratio(vs_fce[name]) if name in vs_fce else "n/a"
        d2h = format_ratio(vs_d2h[name]) if name in vs_d2h else "n/a"
        print(f"{name:<{width}}{len(samples[name]):>3}{seconds[name]:>10.3f}{gbps[name]:>9.2f}"
              f"{cpu[name] * per_gb:>10.3f}{blocked[name]:>15.3f}{blocked_cpu[name] * per_gb:>18.3f}{fce:>13}{d2h:>16}")
    for name, reason in methods.skipped.items():
        print(f"{name:<{width}}  skipped: {reason}")
    if ASYNC in vs_d2h:
        verdict = "met" if vs_d2h[ASYNC] <= BLOCKED_BAR else "NOT met"
        print(f"fast_aio async GPU-blocked / D2H copy: {format_ratio(vs_d2h[ASYNC])} "
              f"(bar <= {format_ratio(BLOCKED_BAR)}): {verdict}")
    if SYNC in vs_fce:
        print(f"fast_aio sync / FastCheckpointEngine throughput: {format_ratio(vs_fce[SYNC])}")
    if SYNC in measured:
        print(f"fast_aio sync: {statistics.median(methods.in_place):.1%} of each file's bytes written in place "
              "(median): sent to disk from the pinned blocks the GPU's bytes were DMAed into, not copied into staging")
    print("seconds: until the file is durable (fsynced); torch's zip CRC32: off for fast_aio (the engine's "
          "default), as shipped (on) for FastCheckpointEngine and torch.save")
    print("CPU s/GB: median per save of this process's CPU time (user + system, every thread), until durable and "
          "over the GPU-blocked part, per GB of state; a thread waiting for the GPU counts (CUDA's default "
          "scheduling spins), the kernel's writeback threads and the GPU's copy engines do not", flush=True)
    print(flush=True)


def measure_size(nbytes: int, args, scratch: Path, device: torch.device, deadline: float) -> None:
    from ds_fastckpt.cli.measure import interleaved

    if deadline and time.monotonic() > deadline:
        print(f"{nbytes / (1 << 30):.2f} GiB: skipped: --time-limit reached", flush=True)
        return
    free = shutil.disk_usage(scratch).free
    if free < 1.5 * nbytes:
        print(f"{nbytes / (1 << 30):.2f} GiB: skipped: {free / (1 << 30):.1f} GiB free in {scratch}, "
              f"{1.5 * nbytes / (1 << 30):.1f} GiB needed", flush=True)
        return
    state = gpu_state(nbytes, device)
    torch.cuda.synchronize()
    total = sum(tensor.untyped_storage().nbytes() for tensor in tensors_of(state))
    methods = Methods(scratch / "ckpt", deadline)
    to_close: List[object] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-writer") as pool:
        # fast_aio last: its untimed snapshot leaves pinned blocks in torch's host cache for its own rounds, which
        # the D2H copy's buffers, allocated from that cache too, must not take.
        add_d2h(methods, state)
        add_fast_checkpoint_engine(methods, state, args.skip_fce)
        add_torch_save(methods, state)
        to_close += add_dcp(methods, state)
        add_fast_aio(methods, state, device, pool)

        def progress(round_index: int, so_far: Dict[str, List[float]]) -> None:
            print(f"{total / (1 << 30):.2f} GiB round {round_index + 1}/{args.rounds}: " +
                  ", ".join(f"{name} {values[-1]:.2f} s" for name, values in so_far.items() if values), flush=True)

        samples = interleaved(methods.guarded(), args.rounds, progress)
    report(total, samples, methods, args.rounds, scratch)
    for item in to_close:
        item.close()
    del state, methods, to_close
    gc.collect()
    torch.cuda.empty_cache()
    if hasattr(torch._C, "_host_emptyCache"):  # the pinned blocks the snapshots left in torch's host cache
        torch._C._host_emptyCache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1GiB,8GiB", help="state sizes, comma-separated (default 1GiB,8GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size (default 3)")
    parser.add_argument("--dir", type=Path, default=Path("."),
                        help="where the scratch directory (removed at the end) is made (default: the cwd)")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds after which no further save starts; the table shows what finished (0: none)")
    parser.add_argument("--skip-fce", default="", metavar="REASON",
                        help="leave out DeepSpeed's FastCheckpointEngine, printing REASON (e.g. its ops did not build)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA device (torch.cuda.is_available() is False); nothing measured")
        return 0

    # Imported only now: importing ds_fastckpt imports DeepSpeed, which is slow and talks on a CPU-only host.
    from ds_fastckpt.cli.bench import parse_size

    try:
        sizes = [parse_size(text) for text in args.sizes.split(",") if text.strip()]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--sizes: {error}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} is not allowed: use 1 or more")
    deadline = time.monotonic() + args.time_limit if args.time_limit > 0 else 0.0
    device = torch.device("cuda", torch.cuda.current_device())
    import deepspeed

    print(f"bench_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, DeepSpeed {deepspeed.__version__}, "
          f"sizes {args.sizes}, {args.rounds} rounds, time limit {args.time_limit or 'none'}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_gpu_") as scratch:
        for nbytes in sizes:
            measure_size(nbytes, args, Path(scratch), device, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
