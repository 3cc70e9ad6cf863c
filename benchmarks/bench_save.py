"""A whole ``engine.save_checkpoint``: fast_aio vs DeepSpeed's default + ``os.sync()`` vs the raw O_DIRECT ceiling.

One process, CPU, ZeRO-1, an fp32 model of N x Linear(width, width) (``--width``)
trained one step with AdamW, so each save writes the model, the fp32 master
partition and both Adam moments (about 16 bytes per parameter; ``--size``
picks the layer count so a save writes about that much). Methods, run once per
round in an order that rotates every round (``ds_fastckpt.cli.measure``):

- ``fast_aio``: the fast_aio engine, synchronous, default options but
  ``keep_last: 2``; every timed save commits and rotates: the oldest
  checkpoint becomes the spare whose files the next save writes over
  (``recycle_retired``), and the spare before it is removed.
- ``fast_aio, recycle_retired off``: the same with ``"recycle_retired":
  false``: every rotation unlinks the oldest checkpoint before the save
  returns, and every save allocates new blocks.
- ``fast_aio, background_delete``: ``"recycle_retired": false,
  "background_delete": true``: the rotated checkpoint is renamed away and
  save_dir fsynced before the save returns, its files unlinked on the
  ``ds_fastckpt-remover`` thread; the time that removal ran on is waited for
  untimed and printed on its own.
- ``default + os.sync()``: DeepSpeed's own checkpoint engine, then ``os.sync()``
  (as durable), then ``shutil.rmtree`` of the checkpoint before the previous
  one (keeps 2, like fast_aio).
- ``raw O_DIRECT``: the op's ``write_aligned`` of as many bytes as a fast_aio
  save writes, from one aligned buffer (the ceiling of ``ds-fastckpt bench``),
  same block size and queue depth, fsynced, into a new file deleted untimed.
- ``raw O_DIRECT overwrite``: the same write over the blocks of the file the
  round before wrote, as fio writes over the file it lays out first and as a
  recycling save writes over its spare. The faster of the two raw writes is
  the ceiling that ``vs ceiling`` and the bar divide by.
- ``memcpy (copy_)``: ``copy_`` of the raw writes' buffer into a
  preallocated tensor of the same size whose pages were touched before: the
  least CPU time and the speed of moving the bytes once in memory, as a save
  does into its staging halves (``Memcpy``).
- ``fast_aio async`` (``--async``): ``"async": true``; timed from
  ``save_checkpoint`` until ``ds_fastckpt.wait(engine)`` has committed and
  the rotated checkpoint is removed; the time ``save_checkpoint`` took to
  return is printed beside it.

GB/s are bytes on disk per save (summed over the tag directory's files) over
the median seconds. ``CPU s/GB`` is the median CPU time (user + system) of
the whole process, every thread of it, over the timed part of a call
(``ProcessClock``), per GB written (copied, for memcpy). ``thread CPU s``
and ``preempted`` are the calling thread's CPU time and involuntary context
switches per call (``Cost``).
``--raw-unlink`` adds the raw write plus the unlink of the file written the
round before: the ceiling of a save that also deletes an old
checkpoint (on a filesystem mounted with ``discard``, unlinking waits for the
disk to discard the freed blocks). ``--profile [N]`` then runs N (default 1)
more fast_aio saves with every phase timed (DeepSpeed's own state-dict
building, laying out, writing, close and fsync, commit, rotation, fd audit)
under cProfile, and measures the CRC-32C and the staging memcpy of the same
byte count on their own.

``--block-size``, ``--queue-depth`` and ``--io-buffer-size`` set DeepSpeed's
``"aio"`` section and fast_aio's ``io_buffer_size`` for every engine; the raw
writes use the same block size and depth.

    python benchmarks/bench_save.py --dir /path/on/the/disk --rounds 3 [--size 256MiB] [--async] [--raw-unlink]
        [--profile [N]] [--block-size 8MiB --io-buffer-size 64MiB]
"""

import argparse
import contextlib
import cProfile
import ctypes
import functools
import io
import os
import pstats
import resource
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from single_process import world_of_one  # benchmarks/single_process.py: scripts import their siblings

import ds_fastckpt  # the import registers the fast_aio engine with DeepSpeed
from ds_fastckpt.cli.arguments import integer_at_least
from ds_fastckpt.cli.bench import parse_size
from ds_fastckpt.cli.measure import format_ratio, interleaved, medians, ratios, timed
from ds_fastckpt.native.op import DIRECT_ALIGNMENT, load_op

FAST = "fast_aio"
DEFAULT = "default + os.sync()"
RAW = "raw O_DIRECT"
RAW_OVERWRITE = "raw O_DIRECT overwrite"
RAW_UNLINK = "raw O_DIRECT + unlink"
ASYNC = "fast_aio async"
BACKGROUND = "fast_aio, background_delete"
NO_RECYCLE = "fast_aio, recycle_retired off"
MEMCPY = "memcpy (copy_)"
BYTES_PER_PARAMETER = 16  # fp32 weight + fp32 master partition + Adam exp_avg + exp_avg_sq
KEEP = 2
WARM_UP_SAVES = KEEP + 1  # so that every timed save rotates and, recycling, writes over a spare
MISSING = object()


def make_engine(layers: int, width: int, checkpoint: dict, aio: Optional[dict] = None):
    """A ZeRO-1 engine on CPU whose Adam state exists (one step taken); ``aio``: DeepSpeed's ``"aio"`` section."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "checkpoint": checkpoint,
        **({"aio": aio} if aio else {}),
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = engine(torch.randn(4, width)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return engine


def tree_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


class ProcessClock:
    """Times a call in wall seconds and in CPU seconds of this whole process; ``cpu`` holds the last call's.

    The calling thread's CPU time leaves out the work a save hands to other threads: the op's I/O thread
    (CRC-32C, submitting and reaping), the async engine's ``ds_fastckpt-writer``, background_delete's
    ``ds_fastckpt-remover`` and torch's intra-op threads. ``time.process_time`` (``CLOCK_PROCESS_CPUTIME_ID``)
    is user + system time summed over every thread of the process, ended ones included; all methods run in this
    process, none in a child. What the kernel does for it on threads of its own is not in it: the writeback of
    the page cache that ``os.sync()`` waits for (kernel flusher threads) and the disk's completions (interrupts,
    ``kblockd``).
    """

    def __init__(self):
        self.cpu = 0.0

    def timed(self, call: Callable[[], object]) -> float:
        """``measure.timed`` that also keeps the process's CPU seconds over the same span in ``cpu``."""
        cpu, start = time.process_time(), time.perf_counter()
        result = call()
        elapsed, self.cpu = time.perf_counter() - start, time.process_time() - cpu
        del result
        return elapsed


class Saver:
    """One engine saving into its own save_dir with increasing tags; keeps the bytes of each save."""

    def __init__(self, engine, save_dir: Path, clock: ProcessClock):
        self.engine = engine
        self.save_dir = save_dir
        self.clock = clock
        self.tags: List[str] = []
        self.bytes: List[int] = []
        self.returned: List[float] = []  # async: seconds until save_checkpoint returned
        self.removals: List[float] = []  # background_delete: seconds the rotated checkpoint's removal ran on after
        self.removal_cpu: List[float] = []  # background_delete: the process's CPU seconds over those

    def _next_tag(self) -> str:
        self.tags.append(f"step{len(self.tags):04d}")
        return self.tags[-1]

    def fast(self, _round_index: int = 0) -> float:
        tag = self._next_tag()
        seconds = self.clock.timed(lambda: self.engine.save_checkpoint(str(self.save_dir), tag=tag))
        self.bytes.append(tree_bytes(self.save_dir / tag))
        return seconds

    def fast_background_delete(self, _round_index: int = 0) -> float:
        """The save as the training thread sees it; the removal it left running is waited for untimed, so that it
        does not slow the next method down, and reported on its own, with the CPU time it took (the process's: the
        main thread only waits), which the save's own CPU time leaves out."""
        seconds = self.fast()
        cpu = time.process_time()
        self.removals.append(timed(self.engine.checkpoint_engine._rotation.finish_removals))
        self.removal_cpu.append(time.process_time() - cpu)
        return seconds

    def default(self, _round_index: int = 0) -> float:
        tag = self._next_tag()

        def save():
            self.engine.save_checkpoint(str(self.save_dir), tag=tag)
            os.sync()
            if len(self.tags) > KEEP:
                shutil.rmtree(self.save_dir / self.tags[-KEEP - 1])

        seconds = self.clock.timed(save)
        self.bytes.append(tree_bytes(self.save_dir / tag))
        return seconds

    def fast_async(self, _round_index: int = 0) -> float:
        tag = self._next_tag()

        def save_and_commit():
            start = time.perf_counter()
            self.engine.save_checkpoint(str(self.save_dir), tag=tag)
            self.returned.append(time.perf_counter() - start)
            ds_fastckpt.wait(self.engine)
            # The rotated checkpoint is removed on the background writer after the commit; wait for it too, so
            # the removal is inside this save's time and does not slow the next method down. No public call waits
            # for it.
            rotation = getattr(self.engine.checkpoint_engine, "_rotation", None)
            if rotation is not None:
                rotation.finish_removals()

        seconds = self.clock.timed(save_and_commit)
        self.bytes.append(tree_bytes(self.save_dir / tag))
        return seconds


class RawWriter:
    """The ceilings of ``ds-fastckpt bench``: the op's O_DIRECT write of one aligned buffer, fsynced.

    ``new`` writes a new file (deleted untimed after), ``overwrite`` writes over the blocks of the file it wrote the
    round before, as fio writes over the file it laid out first, and as a recycling save writes over its spare;
    ``new_and_unlink`` writes a new file and deletes the one before, as a save that rotates without recycling.
    """

    def __init__(self, directory: Path, nbytes: int, tuning: Dict[str, int], clock: ProcessClock):
        self.op = load_op()
        self.clock = clock
        self.size = -(-nbytes // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        self.buffer = torch.ones(self.size + DIRECT_ALIGNMENT, dtype=torch.uint8)
        self.directory = directory
        self.tuning = tuning
        self.written: List[Path] = []
        self.write(directory / "raw_overwrite.bin")  # untimed: the file every overwrite writes over

    def write(self, path: Path, existing: str = "truncate") -> None:
        self.op.write_aligned(str(path), self.buffer, self.size, self.tuning["block_size"],
                              self.tuning["queue_depth"], True, existing)

    def new(self, _round_index: int = 0) -> float:
        target = self.directory / "raw.bin"
        seconds = self.clock.timed(lambda: self.write(target))
        target.unlink()  # not timed
        return seconds

    def overwrite(self, _round_index: int = 0) -> float:
        return self.clock.timed(lambda: self.write(self.directory / "raw_overwrite.bin", "overwrite"))

    def new_and_unlink(self, _round_index: int = 0) -> float:
        """Writes a new file and deletes the one before (if any), as a rotation deletes an old checkpoint."""
        self.written.append(self.directory / f"raw_unlink.{len(self.written)}")

        def both():
            self.write(self.written[-1])
            if len(self.written) > 1:
                self.written[-2].unlink()

        return self.clock.timed(both)


class Memcpy:
    """``copy_`` of ``source`` into a tensor of the same size: what moving the bytes once costs, with no disk.

    Every save copies its bytes at least once (fast_aio into its staging halves, DeepSpeed's engine into the page
    cache); beside the raw write, which only waits, this is the other end of what a save's CPU time can be. The
    target is allocated and written once here, so that no timed copy pays for first touches of its pages.
    """

    def __init__(self, source: torch.Tensor, clock: ProcessClock):
        self.source = source
        self.target = torch.empty_like(source)
        self.clock = clock
        self.target.copy_(source)

    def copy(self, _round_index: int = 0) -> float:
        return self.clock.timed(lambda: self.target.copy_(self.source))


class Cost:
    """Per call of each method: the process's CPU seconds over its timed part (from ``clock``), and the calling
    thread's CPU seconds and how often the kernel preempted it, over the whole call.

    The op copies into staging and hashes on the calling thread while the disk writes; on a small host that
    thread shares its CPUs with the block layer's completion work, and ``ru_nivcsw`` (involuntary context
    switches) shows how often that work took its CPU away. The raw writes only wait.
    """

    def __init__(self, clock: ProcessClock):
        self.clock = clock
        self.process: Dict[str, List[float]] = defaultdict(list)
        self.cpu: Dict[str, List[float]] = defaultdict(list)
        self.preempted: Dict[str, List[int]] = defaultdict(list)

    def wrap(self, name: str, call: Callable[[int], float]) -> Callable[[int], float]:
        def measured(round_index: int = 0) -> float:
            before = resource.getrusage(resource.RUSAGE_THREAD)
            seconds = call(round_index)
            after = resource.getrusage(resource.RUSAGE_THREAD)
            self.process[name].append(self.clock.cpu)
            self.cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            self.preempted[name].append(after.ru_nivcsw - before.ru_nivcsw)
            return seconds

        return measured


class Phases:
    """Wall seconds and calls of named functions, timed by wrapping them in place until ``restore``.

    Only the outermost call of a label counts, so recursion is not counted twice.
    """

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self.missing: List[str] = []
        self._depth: Dict[str, int] = {}
        self._patches = []

    def wrap(self, owner, attr: str, label: str) -> None:
        function = getattr(owner, attr, None)
        if function is None:
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        self.seconds.setdefault(label, 0.0)
        self.calls.setdefault(label, 0)

        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            depth = self._depth.get(label, 0)
            self._depth[label] = depth + 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth[label] = depth
                if depth == 0:
                    self.seconds[label] += time.perf_counter() - start
                    self.calls[label] += 1

        self._patches.append((owner, attr, vars(owner).get(attr, MISSING)))
        setattr(owner, attr, timed_call)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._patches):
            if original is MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._patches.clear()


# (label, depth in the table, what is in it)
_ROWS = [
    ("ds", 1, "DeepSpeed outside the engine (total - engine calls)"),
    ("ds.module", 2, "module_state_dict"),
    ("ds.optimizer", 2, "optimizer.state_dict"),
    ("ds.tag", 2, "tag validation (collective)"),
    ("ds.barrier", 2, "dist.barrier"),
    ("ds.scripts", 2, "copy recovery scripts"),
    ("create", 1, "engine.create (lock, scan, space, pending dir)"),
    ("create.space", 2, "ensure_space"),
    ("makedirs", 1, "engine.makedirs"),
    ("save", 1, "engine.save (both files)"),
    ("lay_out", 2, "lay_out (torch.save under skip_data)"),
    ("lay_out.order", 3, "storages_in_save_order (pickling pass)"),
    ("open", 2, "AioFileWriter open (open, io_setup)"),
    ("write_to", 2, "Layout.write_to"),
    ("write", 3, "AioFileWriter.write (memcpy to staging, CRC-32C, waits for disk)"),
    ("close", 2, "AioFileWriter.close (tail, drain, ftruncate, fsync)"),
    ("commit", 1, "engine.commit"),
    ("commit.wait", 2, "wait_for + gather of records"),
    ("publish", 2, "publish (manifest, rename, latest)"),
    ("publish.scan", 3, "scan save_dir for the sequence"),
    ("publish.sync", 3, "fsync pending dirs"),
    ("publish.manifest", 3, "write manifest (atomic)"),
    ("publish.rename", 3, "rename into place + fsync save_dir"),
    ("publish.latest", 3, "write latest (atomic)"),
    ("rotate", 2, "rotation"),
    ("rotate.retire", 3, "retire (checks + rename to trash or spare)"),
    ("rotate.fsync", 3, "fsync save_dir"),
    ("rotate.remove", 3, "remove_retired (rmtree: the old spare, or ~1 checkpoint)"),
    ("audit", 2, "fd audit (/proc/self/fd)"),
]


def instrument(phases: Phases, engine) -> None:
    import deepspeed.comm
    from deepspeed.runtime.engine import DeepSpeedEngine

    from ds_fastckpt.decisions import rotation
    from ds_fastckpt.engine import checkpoint_engine, commit, rank_group
    from ds_fastckpt.native import layout_save, writer

    engine_class = checkpoint_engine.FastAioCheckpointEngine
    for owner, attr, label in [
        (DeepSpeedEngine, "module_state_dict", "ds.module"),
        (type(engine.optimizer), "state_dict", "ds.optimizer"),
        (DeepSpeedEngine, "_checkpoint_tag_validation", "ds.tag"),
        (deepspeed.comm, "barrier", "ds.barrier"),
        (DeepSpeedEngine, "_copy_recovery_script", "ds.scripts"),
        (engine_class, "create", "create"),
        (checkpoint_engine, "ensure_space", "create.space"),
        (engine_class, "makedirs", "makedirs"),
        (engine_class, "save", "save"),
        (layout_save, "lay_out", "lay_out"),
        (layout_save, "storages_in_save_order", "lay_out.order"),
        (writer.AioFileWriter, "__init__", "open"),
        (layout_save.Layout, "write_to", "write_to"),
        (writer.AioFileWriter, "write", "write"),
        (writer.AioFileWriter, "close", "close"),
        (engine_class, "commit", "commit"),
        (checkpoint_engine, "wait_for", "commit.wait"),
        (rank_group.RankGroup, "gather", "commit.wait"),
        (checkpoint_engine, "publish", "publish"),
        (commit, "scan", "publish.scan"),
        (commit, "_sync_tree", "publish.sync"),
        (commit, "write_manifest", "publish.manifest"),
        (commit, "publish_dir", "publish.rename"),
        (commit, "_write_latest", "publish.latest"),
        (engine_class, "rotate", "rotate"),
        (rotation, "retire", "rotate.retire"),
        (rotation, "fsync_dir", "rotate.fsync"),
        (rotation, "remove_retired", "rotate.remove"),
        (engine_class, "_audit_fds", "audit"),
    ]:
        phases.wrap(owner, attr, label)


def profile_saves(saver: Saver, count: int, buffer: torch.Tensor, nbytes: int, raw_seconds: float) -> None:
    """``count`` more fast_aio saves, every phase timed, under cProfile; then CRC-32C and memcpy of nbytes alone."""
    phases = Phases()
    instrument(phases, saver.engine)
    profiler = cProfile.Profile()
    per_save: List[Dict[str, float]] = []
    try:
        for _ in range(count):
            for label in phases.seconds:
                phases.seconds[label] = 0.0
            profiler.enable()
            total = saver.fast()
            profiler.disable()
            seconds = dict(phases.seconds, total=total)
            seconds["ds"] = total - sum(seconds.get(label, 0.0) for label in ("create", "makedirs", "save", "commit"))
            per_save.append(seconds)
    finally:
        phases.restore()
    written = statistics.median(saver.bytes[-count:])
    mean = {label: statistics.fmean(save[label] for save in per_save) for label in per_save[0]}
    peak = {label: max(save[label] for save in per_save) for label in per_save[0]}
    total = mean["total"]
    totals = ", ".join(f"{save['total']:.3f}" for save in per_save)
    print(f"\n--profile: {count} more fast_aio save(s) of {written / 1e9:.3f} GB with every phase timed (cProfile "
          f"on): {totals} s ({written / total / 1e9:.2f} GB/s mean)")
    print(f"  {'phase':<62}{'mean s':>8}{'share':>8}{'s/GB':>8}{'max s':>8}{'calls':>7}")
    print(f"  {'save_checkpoint':<62}{total:8.3f}{100:7.0f}%{total / written * 1e9:8.3f}{peak['total']:8.3f}")
    for label, depth, text in _ROWS:
        if label not in mean:
            continue
        calls = phases.calls.get(label)
        calls = "" if calls is None else f"{calls / count:g}"
        name = "  " * depth + text
        print(f"  {name:<62}{mean[label]:8.3f}{mean[label] / total * 100:7.1f}%"
              f"{mean[label] / written * 1e9:8.3f}{peak[label]:8.3f}{calls:>7}")
    data_path = mean["write_to"] + mean["close"]
    print(f"  data path (write_to + close) {data_path:.3f} s vs the raw ceiling's median {raw_seconds:.3f} s for the "
          f"same bytes: {data_path - raw_seconds:+.3f} s")
    if phases.missing:
        print(f"  not found, not timed: {', '.join(phases.missing)}")

    # What the op does besides the disk write, each alone on this thread for the same byte count: during write()
    # the caller's thread copies into the staging halves (memcpy) and the op's I/O thread computes CRC-32C.
    op = load_op()
    data = buffer[:nbytes].numpy()
    crc_seconds = statistics.median(timed(lambda: op.crc32c(data)) for _ in range(3))
    staging = torch.empty(16 << 20, dtype=torch.uint8)
    source, target, step = buffer.data_ptr(), staging.data_ptr(), staging.numel()

    def memcpy():
        for offset in range(0, nbytes, step):
            ctypes.memmove(target, source + offset, min(step, nbytes - offset))

    copy_seconds = statistics.median(timed(memcpy) for _ in range(3))
    print(f"  alone, {nbytes / 1e9:.3f} GB: CRC-32C (op.crc32c) {crc_seconds:.3f} s "
          f"({nbytes / crc_seconds / 1e9:.1f} GB/s); memcpy into a 16 MiB half {copy_seconds:.3f} s "
          f"({nbytes / copy_seconds / 1e9:.1f} GB/s)")

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    print(f"\n  cProfile of the {count} save(s), top 12 by own time (main thread only; the op's I/O thread is "
          "not seen):")
    for line in lines[start:]:
        print("  " + line)


def layers_for(size: int, width: int) -> int:
    return max(1, round(size / BYTES_PER_PARAMETER / (width * width + width)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the disk to save to (default: a new temp dir under the current one)")
    parser.add_argument("--size", type=parse_size, default=1 << 30,
                        help="bytes written per save, about (default 1GiB); e.g. 256MiB for a quick run")
    parser.add_argument("--width", type=integer_at_least(8), default=2048, help="Linear width (default 2048)")
    parser.add_argument("--rounds", type=integer_at_least(1), default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--async", dest="async_save", action="store_true",
                        help="also measure the fast_aio engine with \"async\": true")
    parser.add_argument("--raw-unlink", action="store_true",
                        help=f"also measure '{RAW_UNLINK}': the raw write plus the unlink of the file of the round "
                             "before (the ceiling of a save that also deletes an old checkpoint)")
    parser.add_argument("--block-size", type=parse_size, default=None,
                        help="DeepSpeed's aio.block_size for fast_aio and the raw writes (default: DeepSpeed's, 1MiB)")
    parser.add_argument("--queue-depth", type=integer_at_least(1), default=None,
                        help="DeepSpeed's aio.queue_depth (default: DeepSpeed's, 8)")
    parser.add_argument("--io-buffer-size", type=parse_size, default=None,
                        help="fast_aio's io_buffer_size, bytes per staging half (default 16MiB)")
    parser.add_argument("--profile", type=integer_at_least(1), nargs="?", const=1, default=0, metavar="SAVES",
                        help="then time the phases of SAVES (default 1) more fast_aio saves")
    args = parser.parse_args()

    world_of_one()
    created = None
    if args.dir is not None and not args.dir.exists():
        created = args.dir
        args.dir.mkdir(parents=True)
    layers = layers_for(args.size, args.width)
    with tempfile.TemporaryDirectory(dir=args.dir or Path.cwd(), prefix="bench_save_") as scratch:
        root = Path(scratch)
        fast_options = {"keep_last": KEEP, **({"io_buffer_size": args.io_buffer_size} if args.io_buffer_size else {})}
        aio = {key: value for key, value in (("block_size", args.block_size), ("queue_depth", args.queue_depth))
               if value is not None}

        def engine(checkpoint: dict):
            return make_engine(layers, args.width, checkpoint, aio)

        clock = ProcessClock()
        savers = {
            FAST: Saver(engine({"engine": "fast_aio", "fast_aio": fast_options}), root / "fast_aio", clock),
            DEFAULT: Saver(engine({}), root / "default", clock),
        }
        savers[NO_RECYCLE] = Saver(engine({
            "engine": "fast_aio", "fast_aio": {**fast_options, "recycle_retired": False}}), root / "no_recycle", clock)
        savers[BACKGROUND] = Saver(engine({
            "engine": "fast_aio", "fast_aio": {**fast_options, "recycle_retired": False, "background_delete": True}}),
            root / "background", clock)
        if args.async_save:
            savers[ASYNC] = Saver(engine({"engine": "fast_aio", "fast_aio": {**fast_options, "async": True}}),
                                  root / "async", clock)
        calls = {FAST: savers[FAST].fast, NO_RECYCLE: savers[NO_RECYCLE].fast,
                 BACKGROUND: savers[BACKGROUND].fast_background_delete,
                 DEFAULT: savers[DEFAULT].default}
        if args.async_save:
            calls[ASYNC] = savers[ASYNC].fast_async
        for name, call in calls.items():  # untimed: the first saves pay for first touches and fill keep_last
            for _ in range(WARM_UP_SAVES):
                call()
        nbytes = savers[FAST].bytes[-1]
        tuning = savers[FAST].engine.checkpoint_engine.tuning
        raw = RawWriter(root, nbytes, tuning, clock)
        raw.new()
        memcpy = Memcpy(raw.buffer[:raw.size], clock)
        if args.raw_unlink:
            raw.new_and_unlink()  # untimed: the first file, which the first timed call deletes
        raws = {RAW: raw.new, RAW_OVERWRITE: raw.overwrite}
        if args.raw_unlink:
            raws[RAW_UNLINK] = raw.new_and_unlink
        references = {**raws, MEMCPY: memcpy.copy}  # all of raw.size bytes
        methods = {**references, **calls}
        print(f"{layers} x Linear({args.width}, {args.width}) fp32 + AdamW, ZeRO-1, 1 process on CPU; "
              f"{nbytes / 1e9:.3f} GB per fast_aio save; block_size {tuning['block_size'] >> 10} KiB, "
              f"queue_depth {tuning['queue_depth']}; {root}", flush=True)

        def written(name: str) -> int:
            return raw.size if name in references else statistics.median(savers[name].bytes[WARM_UP_SAVES:])

        def progress(round_index: int, samples: Dict[str, List[float]]) -> None:
            print(f"round {round_index + 1}/{args.rounds}: " +
                  ", ".join(f"{name} {values[-1]:.2f} s" for name, values in samples.items()), flush=True)

        cost = Cost(clock)
        samples = interleaved({name: cost.wrap(name, call) for name, call in methods.items()}, args.rounds, progress)
        median = medians(samples)
        gbps = {name: written(name) / seconds / 1e9 for name, seconds in median.items()}
        ceiling = max((RAW, RAW_OVERWRITE), key=gbps.get)  # the faster write is the ceiling
        vs_ceiling, vs_default = ratios(gbps, ceiling), ratios(gbps, DEFAULT)

        print(f"\nmedian of {args.rounds} interleaved rounds, durable saves, keep_last {KEEP} (rotation timed)")
        width = max(len(name) for name in methods) + 2
        print(f"{'method':<{width}}{'median s':>10}{'GB/save':>9}{'GB/s':>7}{'CPU s/GB':>10}{'vs ceiling':>12}"
              f"{'vs default':>12}{'thread CPU s':>14}{'preempted':>11}")
        for name in methods:
            cpu_per_gb = statistics.median(cost.process[name]) / written(name) * 1e9
            print(f"{name:<{width}}{median[name]:10.3f}{written(name) / 1e9:9.3f}{gbps[name]:7.2f}{cpu_per_gb:10.3f}"
                  f"{format_ratio(vs_ceiling[name]):>12}{format_ratio(vs_default[name]):>12}"
                  f"{statistics.median(cost.cpu[name]):14.3f}{statistics.median(cost.preempted[name]):11.0f}")
        print("CPU s/GB: median per call of the whole process's CPU time (user + system, every thread) over the timed "
              f"part, per GB written (copied, for {MEMCPY}: torch's {torch.get_num_threads()} intra-op threads); "
              "not in it: the kernel's writeback for os.sync() and the disk's completions")
        print("thread CPU s, preempted: medians per call of the calling thread's CPU time and involuntary context "
              "switches")
        if args.async_save:
            returned = statistics.median(savers[ASYNC].returned[WARM_UP_SAVES:])
            print(f"{ASYNC}: save_checkpoint returned in {returned:.3f} s (median); committed and rotated "
                  f"{median[ASYNC] - returned:.3f} s later")
        removal = statistics.median(savers[BACKGROUND].removals[WARM_UP_SAVES:])
        removal_cpu = statistics.median(savers[BACKGROUND].removal_cpu[WARM_UP_SAVES:])
        print(f"{BACKGROUND}: the rotated checkpoint's removal ran on {removal:.3f} s (median) after the save "
              f"returned, on the ds_fastckpt-remover thread, and took {removal_cpu:.3f} CPU s more (not in CPU s/GB)")
        for name in (FAST, NO_RECYCLE, BACKGROUND):
            print(f"bars, {name}: / ceiling ({ceiling}) {vs_ceiling[name]:.2f} (bar >= 0.80, goal 0.95): "
                  f"{'met' if vs_ceiling[name] >= 0.8 else 'NOT met'}; / {DEFAULT} {format_ratio(vs_default[name])} "
                  f"(bar >= 1.50x): {'met' if vs_default[name] >= 1.5 else 'NOT met'}")
        if args.raw_unlink:
            print(f"{NO_RECYCLE} / {RAW_UNLINK}: {gbps[NO_RECYCLE] / gbps[RAW_UNLINK]:.2f} (the same work as a "
                  "rotating save: write the bytes, delete as many)")

        if args.profile:
            profile_saves(savers[FAST], args.profile, raw.buffer, nbytes, median[ceiling] * nbytes / raw.size)
        for saver in savers.values():
            saver.engine.destroy()
    if created is not None:
        with contextlib.suppress(OSError):
            created.rmdir()  # only if empty: nothing of anyone else's is removed


if __name__ == "__main__":
    main()
