"""The remote tier on a real SeaweedFS server: upload and restore vs boto3/s3transfer, and the step cost of replicating.

Starts its own SeaweedFS server (``weed mini``, as the tests run it:
``tests.remote.conftest.SeaweedServer``) with its data in ``--dir`` (default:
a temp dir under the checkout), saves one ZeRO-1 checkpoint of about
``--size`` with fast_aio and ``replicate`` (its replication, local commit to
``ds_fastckpt.wait_all()``, is printed), and stops the server at the end,
also on an error or Ctrl-C. Three measurements, each ``--rounds`` rounds,
the order of the contenders rotating every round
(``ds_fastckpt.cli.measure.interleaved``); medians, ratios against the
baseline measured in the same run:

1. upload of the checkpoint's files, one after the other, each to a fresh
   prefix (deleted untimed after): ``S3Store.upload_file`` with the
   manifest's size and CRC-32C (parts of ``part_size`` 16 MiB, the config
   default, ``--concurrency`` at once) vs s3transfer's ``client.upload_file``
   with ``TransferConfig(multipart_chunksize=16 MiB, multipart_threshold=16
   MiB, max_concurrency=N)``;
2. restore of the replicated checkpoint into an empty save_dir:
   ``remote_resume.restore_alone`` (download, CRC-32C check, fsync, local
   commit with its manifest) vs s3transfer's ``client.download_file`` of the
   same objects, then an fsync of each file and of the directory; s3transfer
   checks no checksum;
3. a CPU training loop (one thread, ``keep_last`` 2, ``--steps`` steps per
   mode per round, the first dropped): no saves; a synchronous save every
   ``--save-every`` steps; the same with ``replicate``. Step overhead while
   replicating = median time of the steps that began with an upload in
   flight minus the median step without saves, against the median
   synchronous save. The model (2 x Linear(2048, 2048), batch 8, fused
   AdamW) takes at most as long for a step as for a synchronous save.

Both S3 clients are configured alike: s3transfer's client is made with the
botocore ``Config`` of ``S3Store``'s own client (printed). Client and server
share this machine's CPUs; the CPU seconds each used are printed too.
``--pin`` pins, for the training loop only, the training thread to the first
CPU and every other thread (uploads, commits, the server) to the last, as on
a GPU host whose store is elsewhere and whose other cores serve the uploads.

    python benchmarks/bench_replicate.py [--dir /path/on/the/disk] [--size 1GiB] [--rounds 5] [--concurrency 8]
        [--steps 20] [--save-every 10] [--pin]
"""

import argparse
import contextlib
import logging
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import boto3
import boto3.s3.transfer
import torch
from single_process import world_of_one  # benchmarks/single_process.py: scripts import their siblings

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from tests.remote.conftest import SeaweedServer, weed_binary  # noqa: E402  (needs the repo root on the path)

import ds_fastckpt  # noqa: E402  (the import registers the fast_aio engine with DeepSpeed)
from ds_fastckpt.cli.arguments import integer_at_least  # noqa: E402
from ds_fastckpt.cli.bench import parse_size  # noqa: E402
from ds_fastckpt.cli.measure import format_ratio, interleaved, medians  # noqa: E402
from ds_fastckpt.engine.remote_resume import restore_alone  # noqa: E402
from ds_fastckpt.format.manifest import read_manifest  # noqa: E402
from ds_fastckpt.remote.catalog import read_catalog  # noqa: E402
from ds_fastckpt.remote.options import ReplicateConfig  # noqa: E402
from ds_fastckpt.remote.s3_store import S3Store  # noqa: E402

OURS, S3T = "ds_fastckpt", "s3transfer"
NO_SAVES, SYNC, REPLICATING = "no saves", "sync saves", "sync saves + replicate"
PART_SIZE = ReplicateConfig.model_fields["part_size"].default
TIMEOUT_S = 60
BYTES_PER_PARAMETER = 16  # fp32 weight + fp32 master partition + Adam exp_avg + exp_avg_sq (ZeRO-1)
BATCH = 8
TRAIN_WIDTH = 2048  # with BATCH and the fused AdamW a step takes at most as long as a sync save of its state
MiB = 1 << 20
BUCKET = "ds-fastckpt-bench"
UPLOADS, TIER, TRAINING = "upload", "tier", "training"  # prefixes in BUCKET


class CpuMeter:
    """CPU seconds this process and the server used during each call, per name."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.client: Dict[str, List[float]] = {}
        self.server: Dict[str, List[float]] = {}

    def _server_seconds(self) -> float:
        with open(f"/proc/{self.server_pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def wrap(self, name: str, call: Callable[[int], object]) -> Callable[[int], object]:
        def measured(round_index: int):
            own, server = resource.getrusage(resource.RUSAGE_SELF), self._server_seconds()
            result = call(round_index)
            after = resource.getrusage(resource.RUSAGE_SELF)
            self.client.setdefault(name, []).append(after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime)
            self.server.setdefault(name, []).append(self._server_seconds() - server)
            return result

        return measured


def make_engine(layers: int, width: int, fast_aio: dict, zero_stage: int):
    """A CPU engine of ``layers`` x Linear(width, width) (ReLU between) whose Adam state exists (one step taken)."""
    import deepspeed

    torch.manual_seed(0)
    blocks: List[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*blocks[:-1])
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True, "fused": True}},
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"engine": "fast_aio", "fast_aio": fast_aio},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    train_step(engine, width)
    return engine


def train_step(engine, width: int) -> None:
    loss = engine(torch.randn(BATCH, width)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def replicate_section(url: str, server: SeaweedServer, concurrency: int) -> dict:
    return {"url": url, "endpoint_url": server.endpoint_url, "concurrency": concurrency, "keep_last": 2,
            "request_timeout_s": TIMEOUT_S, "wait_timeout_s": 120}


def delete_prefix(client, bucket: str, prefix: str) -> int:
    """Deletes every object under ``prefix``; returns the bytes they held."""
    held, keys = 0, []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            held += entry["Size"]
            keys.append({"Key": entry["Key"]})
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + 1000], "Quiet": True})
    return held


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Transfers:
    """One checkpoint's files moved by both contenders, each round to or from fresh places, cleaned up untimed."""

    def __init__(self, store: S3Store, tier: S3Store, client, save_dir: Path, tag: str, restore_root: Path,
                 transfer_config):
        self.store, self.tier, self.client = store, tier, client
        self.bucket = store.bucket
        self.tag_dir = save_dir / tag
        self.tag = tag
        self.restore_root = restore_root
        self.config = transfer_config
        self.manifest = read_catalog(tier).complete[tag]
        self.files = self.manifest.files
        self.total = sum(record.bytes for record in self.files)

    def _check_uploaded(self, prefix: str) -> None:
        held = delete_prefix(self.client, self.bucket, prefix)
        if held != self.total:
            raise RuntimeError(f"{prefix} held {held} bytes after the upload, not {self.total}")

    def upload_ours(self, round_index: int) -> float:
        where = f"{OURS}-{round_index}"
        start = time.perf_counter()
        for record in self.files:
            self.store.upload_file(self.tag_dir / record.path, f"{where}/{record.path}", size=record.bytes,
                                   crc32c=record.crc32c)
        seconds = time.perf_counter() - start
        self._check_uploaded(f"{UPLOADS}/{where}/")
        return seconds

    def upload_s3transfer(self, round_index: int) -> float:
        where = f"{UPLOADS}/{S3T}-{round_index}"
        start = time.perf_counter()
        for record in self.files:
            self.client.upload_file(str(self.tag_dir / record.path), self.bucket, f"{where}/{record.path}",
                                    Config=self.config)
        seconds = time.perf_counter() - start
        self._check_uploaded(f"{where}/")
        return seconds

    def restore_ours(self, round_index: int) -> float:
        save_dir = self.restore_root / f"{OURS}-{round_index}"
        start = time.perf_counter()
        restore_alone(self.tier, save_dir, self.tag, self.manifest)
        seconds = time.perf_counter() - start
        shutil.rmtree(save_dir)
        os.sync()  # the deletion's journal work is not the next method's
        return seconds

    def restore_s3transfer(self, round_index: int) -> float:
        tag_dir = self.restore_root / f"{S3T}-{round_index}" / self.tag
        start = time.perf_counter()
        tag_dir.mkdir(parents=True)
        for record in self.files:
            target = tag_dir / record.path
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, f"{TIER}/{self.tag}/{record.path}", str(target), Config=self.config)
        for record in self.files:
            fsync_path(tag_dir / record.path)
        fsync_path(tag_dir)
        seconds = time.perf_counter() - start
        if sum(os.path.getsize(tag_dir / record.path) for record in self.files) != self.total:
            raise RuntimeError(f"s3transfer's download into {tag_dir} is not {self.total} bytes")
        shutil.rmtree(tag_dir.parent)
        os.sync()
        return seconds


@dataclass
class Step:
    seconds: float
    saved: bool
    uploading: bool  # an upload of this engine's was in flight when the step began


class Pinning:
    """``--pin``: the training thread on the first CPU; this process's other threads and the server's on the last,
    as if the store were another machine's and the uploads had a core of their own."""

    def __init__(self, server_pid: int):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        self.all, self.training, self.others = set(cpus), {cpus[0]}, {cpus[-1]}
        self.pids = (os.getpid(), server_pid)
        self.main = threading.get_native_id()

    def _set(self, training: set, others: set) -> None:
        for pid in self.pids:
            for tid in map(int, os.listdir(f"/proc/{pid}/task")):
                with contextlib.suppress(OSError):  # a thread that ended meanwhile
                    os.sched_setaffinity(tid, training if tid == self.main else others)

    def apply(self) -> None:
        """Pins every thread there is now; called again after each save, which may start the upload threads."""
        self._set(self.training, self.others)

    def release(self) -> None:
        self._set(self.all, self.all)


class Training:
    """bench_async.py's CPU loop, three ways: no saves, sync saves, sync saves with ``replicate``."""

    def __init__(self, root: Path, server: SeaweedServer, steps: int, save_every: int, concurrency: int,
                 pinning: Optional[Pinning]):
        self.root, self.steps, self.save_every, self.pinning = root, steps, save_every, pinning
        self.plain = make_engine(2, TRAIN_WIDTH, {"keep_last": 2}, zero_stage=0)
        self.replicating = make_engine(2, TRAIN_WIDTH, {"keep_last": 2, "replicate": replicate_section(
            f"s3://{BUCKET}/{TRAINING}", server, concurrency)}, zero_stage=0)
        self.replication = self.replicating.checkpoint_engine._replication
        self.upload_seconds: List[float] = []
        self.drain_seconds: List[float] = []  # the run's last save returned -> wait_all() returned
        self.saves: Dict[str, List[float]] = {SYNC: [], REPLICATING: []}
        self.records: Dict[str, List[Step]] = {NO_SAVES: [], SYNC: [], REPLICATING: []}
        upload = self.replication.uploader._upload

        def timed_upload(job):  # the uploader thread's time on one checkpoint's files and reports
            start = time.perf_counter()
            try:
                return upload(job)
            finally:
                self.upload_seconds.append(time.perf_counter() - start)

        self.replication.uploader._upload = timed_upload

    def _run(self, name: str, engine, save_dir: Optional[Path]) -> List[float]:
        records, last_save = [], None
        if self.pinning is not None:
            self.pinning.apply()
        for index in range(1, self.steps + 1):
            uploading = engine is self.replicating and bool(self.replication.uploader.unfinished())
            start = time.perf_counter()
            train_step(engine, TRAIN_WIDTH)
            saved = save_dir is not None and index % self.save_every == 0
            if saved:
                save_start = time.perf_counter()
                engine.save_checkpoint(str(save_dir))
                last_save = time.perf_counter()
                self.saves[name].append(last_save - save_start)
                if self.pinning is not None:
                    self.pinning.apply()
            records.append(Step(time.perf_counter() - start, saved, uploading))
        if engine is self.replicating:
            ds_fastckpt.wait_all()  # untimed: the next run starts with nothing in flight
            if records[-1].saved:
                self.drain_seconds.append(time.perf_counter() - last_save)
        self.records[name].extend(records[1:])  # the first step of a run pays for the mode switch
        return [step.seconds for step in records[1:] if not step.saved]

    def methods(self) -> Dict[str, Callable[[int], List[float]]]:
        return {
            NO_SAVES: lambda _: self._run(NO_SAVES, self.plain, None),
            SYNC: lambda _: self._run(SYNC, self.plain, self.root / "sync"),
            REPLICATING: lambda _: self._run(REPLICATING, self.replicating, self.root / "replicating"),
        }

    def close(self) -> None:
        for engine in (self.plain, self.replicating):
            engine.destroy()


class CommitLog(logging.Handler):
    """The committer's "replicated (N s after its local commit)" figures, as it logs them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: List[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "is replicated to" in record.msg and "after its local commit" in record.msg:
            self.seconds.append(float(record.args[-1]))


def checkpoint_shape(size: int) -> Tuple[int, int]:
    """(layers, width) of a ZeRO-1 model whose checkpoint is about ``size`` bytes."""
    width = 4096
    while BYTES_PER_PARAMETER * width * (width + 1) > size and width > 256:
        width //= 2
    return max(1, round(size / (BYTES_PER_PARAMETER * width * (width + 1)))), width


def save_replicated_checkpoint(root: Path, server: SeaweedServer, size: int, concurrency: int
                               ) -> Tuple[Path, str, float]:
    """Saves one ZeRO-1 checkpoint into root/ckpt, replicated to s3://bucket/tier; returns (save_dir, tag,
    seconds from save_checkpoint returning to wait_all() returning)."""
    layers, width = checkpoint_shape(size)
    engine = make_engine(layers, width, {"keep_last": 2, "replicate": replicate_section(
        f"s3://{BUCKET}/{TIER}", server, concurrency)}, zero_stage=1)
    save_dir = root / "ckpt"
    engine.save_checkpoint(str(save_dir))
    start = time.perf_counter()
    ds_fastckpt.wait_all()
    replicated = time.perf_counter() - start
    engine.destroy()
    tag = (save_dir / "latest").read_text().strip()
    if read_manifest(save_dir / tag) is None:
        raise RuntimeError(f"{save_dir / tag} has no manifest")
    return save_dir, tag, replicated


def describe_config(client) -> str:
    config = client.meta.config
    return (f"endpoint {client.meta.endpoint_url}, addressing {config.s3.get('addressing_style')}, "
            f"request_checksum_calculation={config.request_checksum_calculation}, "
            f"response_checksum_validation={config.response_checksum_validation}, "
            f"max_pool_connections={config.max_pool_connections}, retries={config.retries}, "
            f"timeouts {config.connect_timeout}/{config.read_timeout} s; over http botocore signs every body "
            "with SHA-256 (both)")


def report_rates(title: str, seconds: Dict[str, List[float]], total: int, cpu: CpuMeter, names: Dict[str, str],
                 bar: str) -> None:
    median = medians(seconds)
    print(f"\n{title}: {total / 1e6:.0f} MB, median of {len(seconds[OURS])} rounds")
    for key, label in names.items():
        print(f"  {label}\n    {total / 1e6 / median[key]:5.0f} MB/s ({total / 1e6 / max(seconds[key]):.0f} to "
              f"{total / 1e6 / min(seconds[key]):.0f}), {median[key]:.2f} s; CPU s client "
              f"{statistics.median(cpu.client[key]):.1f}, server {statistics.median(cpu.server[key]):.1f}")
    print(f"  ours / s3transfer: {format_ratio(median[S3T] / median[OURS])} (bar {bar})")


def progress_of(rounds: int, what: str, unit: Callable[[float], str]):
    def progress(round_index: int, samples: Dict[str, List[float]]) -> None:
        print(f"{what} round {round_index + 1}/{rounds}: " +
              ", ".join(f"{name} {unit(values[-1])}" for name, values in samples.items()), flush=True)

    return progress


def median_or_nan(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def same_client(store: S3Store):
    """A client with the botocore ``Config`` of ``store``'s own, for s3transfer: only the transfer code differs."""
    ours = store._client
    return boto3.session.Session().client("s3", endpoint_url=ours.meta.endpoint_url,
                                          region_name=ours.meta.region_name, config=ours.meta.config)


def measure_transfers(args, root: Path, server: SeaweedServer) -> None:
    """Measurements 1 and 2: upload and restore of one checkpoint, ours vs s3transfer."""
    save_dir, tag, replicated = save_replicated_checkpoint(root, server, args.size, args.concurrency)
    options = dict(endpoint_url=server.endpoint_url, part_size=PART_SIZE, concurrency=args.concurrency,
                   request_timeout_s=TIMEOUT_S)
    store, tier = S3Store(f"s3://{BUCKET}/{UPLOADS}", **options), S3Store(f"s3://{BUCKET}/{TIER}", **options)
    client = same_client(store)
    transfer_config = boto3.s3.transfer.TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                                      max_concurrency=args.concurrency, use_threads=True)
    transfers = Transfers(store, tier, client, save_dir, tag, root / "restore", transfer_config)
    total = transfers.total
    print(f"checkpoint {tag}: {len(transfers.files)} files, {total / 1e6:.0f} MB "
          f"({', '.join(f'{record.path} {record.bytes / 1e6:.0f} MB' for record in transfers.files)}); "
          f"replicated by the engine (save_checkpoint returned -> wait_all() returned) in {replicated:.1f} s",
          flush=True)
    print(f"S3 client of both: {describe_config(client)}", flush=True)

    def mbps(seconds: float) -> str:
        return f"{total / 1e6 / seconds:.0f} MB/s"

    try:
        upload_cpu = CpuMeter(server._process.pid)
        uploads = interleaved({OURS: upload_cpu.wrap(OURS, transfers.upload_ours),
                               S3T: upload_cpu.wrap(S3T, transfers.upload_s3transfer)},
                              args.rounds, progress_of(args.rounds, "upload", mbps))
        restore_cpu = CpuMeter(server._process.pid)
        restores = interleaved({OURS: restore_cpu.wrap(OURS, transfers.restore_ours),
                                S3T: restore_cpu.wrap(S3T, transfers.restore_s3transfer)},
                               args.rounds, progress_of(args.rounds, "restore", mbps))
    finally:
        store.close()
        tier.close()
    suffix = f"part_size {PART_SIZE // MiB} MiB, concurrency {args.concurrency}"
    report_rates("Upload", uploads, total, upload_cpu,
                 {OURS: f"{OURS} S3Store.upload_file (CRC-32C per part), {suffix}",
                  S3T: f"{S3T} client.upload_file, same chunk size and concurrency"}, ">= 0.90x")
    report_rates("Restore into an empty save_dir", restores, total, restore_cpu,
                 {OURS: f"{OURS} restore_alone (CRC-32C checked, fsync, commit), {suffix}",
                  S3T: f"{S3T} client.download_file + fsync (no checksum)"}, ">= 0.90x")


def measure_training(args, root: Path, server: SeaweedServer) -> None:
    """Measurement 3: the training loop without saves, with sync saves, with sync saves and ``replicate``."""
    commit_log = CommitLog()
    committer_logger = logging.getLogger("ds_fastckpt.remote.committer")
    committer_logger.addHandler(commit_log)
    committer_logger.setLevel(logging.INFO)
    pinning = Pinning(server._process.pid) if args.pin else None
    training = Training(root / TRAINING, server, args.steps, args.save_every, args.concurrency, pinning)
    cpu = CpuMeter(server._process.pid)
    try:
        methods = {name: cpu.wrap(name, method) for name, method in training.methods().items()}
        interleaved(methods, args.rounds, progress_of(args.rounds, "training", lambda s: f"{s * 1e3:.0f} ms/step"))
    finally:
        if pinning is not None:
            pinning.release()
        training.close()
    committer_logger.removeHandler(commit_log)

    records = training.records
    baseline = statistics.median(step.seconds for step in records[NO_SAVES])
    sync_steps = [step.seconds for step in records[SYNC] if not step.saved]
    replicating = [step.seconds for step in records[REPLICATING] if not step.saved]
    in_flight = [step.seconds for step in records[REPLICATING] if not step.saved and step.uploading]
    sync_save = statistics.median(training.saves[SYNC])
    overhead = median_or_nan(in_flight) - baseline
    newest = max((root / TRAINING / "replicating").glob("global_step*"), key=lambda path: path.stat().st_mtime)
    where = " pinned to one CPU, every other thread and the server to another" if args.pin else ""
    print(f"\nTraining, one thread{where}, checkpoint {read_manifest(newest).total_bytes / 1e6:.0f} MB every "
          f"{args.save_every} steps, {args.rounds} rounds x {args.steps} steps, median step time:")
    print(f"  {NO_SAVES:<48} {baseline * 1e3:7.1f} ms ({len(records[NO_SAVES])} steps)")
    print(f"  {SYNC + ', steps without a save':<48} {statistics.median(sync_steps) * 1e3:7.1f} ms")
    print(f"  {REPLICATING + ', steps without a save':<48} {statistics.median(replicating) * 1e3:7.1f} ms "
          f"({len(replicating)} steps)")
    print(f"  {REPLICATING + ', upload in flight':<48} {median_or_nan(in_flight) * 1e3:7.1f} ms "
          f"({len(in_flight)} steps)")
    print(f"  sync save (save_checkpoint): {sync_save * 1e3:.0f} ms without replicate, "
          f"{statistics.median(training.saves[REPLICATING]) * 1e3:.0f} ms with")
    print(f"step overhead while replicating: {overhead * 1e3:.1f} ms (all steps without a save: "
          f"{(statistics.median(replicating) - baseline) * 1e3:.1f} ms)")
    print(f"step overhead while replicating / sync save: {format_ratio(overhead / sync_save)} (bar <= 0.25x)")
    print(f"replication of one checkpoint: upload thread {median_or_nan(training.upload_seconds):.2f} s, "
          f"local commit -> remote commit {median_or_nan(commit_log.seconds):.2f} s (committer's log), "
          f"last save -> wait_all() {median_or_nan(training.drain_seconds):.2f} s (medians)")
    print("CPU s per round, client / server: " + ", ".join(
        f"{name} {statistics.median(cpu.client[name]):.1f} / {statistics.median(cpu.server[name]):.1f}"
        for name in records))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the server's data and the checkpoints go (default: a temp dir under the checkout)")
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="checkpoint size (default 1GiB)")
    parser.add_argument("--rounds", type=integer_at_least(1), default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--concurrency", type=integer_at_least(1), default=8, help="parts at once (default 8)")
    parser.add_argument("--steps", type=integer_at_least(2), default=20, help="training steps per mode per round")
    parser.add_argument("--save-every", type=integer_at_least(1), default=10, help="steps between saves")
    parser.add_argument("--pin", action="store_true",
                        help="training: pin the training thread to the first CPU, every other thread of this process "
                             "and the server to the last")
    args = parser.parse_args()
    if args.save_every > args.steps:
        parser.error(f"--save-every {args.save_every} is more than --steps {args.steps}: no run would save")

    torch.set_num_threads(1)
    world_of_one()
    # SIGTERM ends the run as Ctrl-C does: through the finally clauses that stop the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with tempfile.TemporaryDirectory(dir=args.dir or REPO_ROOT, prefix="bench_replicate_") as temp:
        root = Path(temp)
        (root / "seaweed").mkdir()
        server = SeaweedServer(weed_binary(), root / "seaweed")
        try:
            server.start()
            os.environ.update(server.env())  # the credentials every S3 client here uses
            server.make_bucket(BUCKET)
            started = time.perf_counter()
            measure_transfers(args, root, server)
            measure_training(args, root, server)
            print(f"\ntotal {time.perf_counter() - started:.0f} s")
        finally:
            server.close()


if __name__ == "__main__":
    main()
