"""SIGKILL a 2-rank training job (torchrun, ZeRO-2: each rank saves its own optimizer partition, and with
``parallel_writers: "all"`` both ranks write shares of the model-states file) at named points
of a save and at random moments; every rank must resume exactly the state saved at the step it resumes, never
a partial checkpoint, and once a save has completed there must always be a complete checkpoint, no older than
the newest save that returned.

``make test`` runs 8 kills (DS_FASTCKPT_TWO_RANK_KILLS): 6 at the named save points, one each, and 2 at
random moments; ``make test-long`` runs 40: 30 named, 5 at each point, and 10 random. Each kill costs a
torchrun job of 10-20 s on 2 cores, mostly imports, so 8 kills take about 2 minutes. Of every 4 kills, 3 hit
the named points in turn on the rank that reaches them (rank 1 for the file points, at hit 1-3: its share of
the model-states file or its optimizer partition, which it writes in turn; rank 0, the storage leader, for the commit points), which SIGKILLs itself there and torchrun tears
the other rank down; the 4th SIGKILLs torchrun and both ranks a random moment after they have resumed.
Every job resumes from what the previous kill left, so job k+1 checks kill k; one more job only resumes,
to check the last kill.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from ds_fastckpt.faults.save_points import POINTS
from ds_fastckpt.format.records import complete_checkpoints, scan

KILLS = int(os.environ.get("DS_FASTCKPT_TWO_RANK_KILLS", "8"))
STEPS_PER_JOB = 6
FILE_POINTS = ("before_file_close", "after_file_write")  # reached on rank 1 as it writes its share or partition
JOB_TIMEOUT_S = 300  # a job takes 10-20 s; only a hang gets near this
CHILD = Path(__file__).resolve().parent / "kill_child_two_ranks.py"
REPO = Path(__file__).resolve().parents[2]


def plan(kill: int, rng: random.Random):
    """(point, hit, rank that dies there, random delay): 3 of every 4 kills at the named points in turn."""
    if kill % 4 == 3:
        return "-", 0, -1, rng.uniform(0.0, 0.5)  # 6 saves take about 0.4 s after the resume, more under load
    point = POINTS[(kill - kill // 4) % len(POINTS)]
    return point, rng.randint(1, 3), 1 if point in FILE_POINTS else 0, None


def read_log(log_dir: Path, rank: int) -> list:
    log = log_dir / f"rank{rank}.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def children(pid: int) -> list:
    """Pids whose parent is ``pid`` (torchrun's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def kill_job(torchrun: subprocess.Popen) -> None:
    """SIGKILLs torchrun and its workers, and waits until none runs: the next job must not share save_dir
    with a survivor. torchrun starts each worker in a session of its own, so killing its group is not enough."""
    workers = children(torchrun.pid)
    for pid in [torchrun.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    torchrun.wait()
    deadline = time.monotonic() + 60
    while not all(dead(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} still alive 60 s after SIGKILL"
        time.sleep(0.01)


def run_job(tmp_path: Path, job: int, point: str, hit: int, rank: int, steps: int, kill_after):
    """Runs one job until it ends, a rank kills itself, or (kill_after set) we SIGKILL it that many seconds after
    both ranks have reported; returns (the two reports, torchrun's return code, the end of its stderr)."""
    report_dir = tmp_path / f"job{job}"
    report_dir.mkdir()
    reports = [report_dir / f"rank{r}.json" for r in (0, 1)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    stderr_path = tmp_path / f"job{job}.stderr"
    # stderr to a file, not a pipe: nobody reads a pipe while we wait, and a full one would stall the job.
    with open(stderr_path, "wb") as stderr:
        torchrun = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(CHILD), str(tmp_path / "ckpts"),
             str(tmp_path), str(report_dir), point, str(hit), str(rank), str(steps)],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        if kill_after is not None:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while not all(r.exists() for r in reports) and torchrun.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(kill_after)
            kill_job(torchrun)
        torchrun.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass  # reported below, once every process is gone
    finally:
        if torchrun.poll() is None:
            kill_job(torchrun)
            raise AssertionError(f"job {job} hung; its stderr: {stderr_path.read_text(errors='replace')[-3000:]}")
    tail = stderr_path.read_text(errors="replace")[-3000:]
    assert all(r.exists() for r in reports), f"job {job} did not report: {tail}"
    return [json.loads(r.read_text()) for r in reports], torchrun.returncode, tail


def latest_text(save_dir: Path) -> str:
    try:
        return (save_dir / "latest").read_text().strip()
    except FileNotFoundError:
        return ""


def test_kill_sweep_two_ranks(tmp_path):
    rng = random.Random(4321)
    save_dir = tmp_path / "ckpts"
    resumed_a_checkpoint = False
    for job in range(KILLS + 1):
        # What is on disk and what each rank had saved, before this job resumes from it.
        complete = complete_checkpoints(scan(save_dir)) if save_dir.exists() else []
        latest = latest_text(save_dir)
        logs = [read_log(tmp_path, r) for r in (0, 1)]
        saved = [entry["saved"] for log in logs for entry in log if "saved" in entry]
        assert complete or not saved, f"before job {job}: saves {saved} had completed, no checkpoint is left"
        if job < KILLS:
            point, hit, kill_rank, kill_after = plan(job, rng)
            steps = STEPS_PER_JOB
        else:
            point, hit, kill_rank, kill_after, steps = "-", 0, -1, None, 0
        reports, returncode, tail = run_job(tmp_path, job, point, hit, kill_rank, steps, kill_after)

        where = f"job {job} (after the previous kill)"
        for rank, report in enumerate(reports):
            if not complete:
                assert report["load_path"] is None and report["step"] == 0, (where, rank, report)
                continue
            assert report["load_path"] is not None, (where, rank, report)
            # What `latest` names when it is complete (a save killed between its rename and `latest` never
            # returned), else the newest complete one; never one older than a save that returned.
            named = [record for record in complete if record.tag == latest]
            expected = (named or complete)[-1].manifest.step
            assert report["step"] == expected >= max(saved, default=0), (where, rank, report)
            # A later job that resumed from before a step records it again; only its latest save can be on disk.
            recorded = {entry["recorded"]: entry["digest"] for entry in logs[rank] if "recorded" in entry}
            assert report["digest"] == recorded.get(report["step"]), f"{where}: rank {rank} did not resume bit-exactly"
            resumed_a_checkpoint = True

        if point != "-":
            killed = any("killing" in entry for entry in read_log(tmp_path, kill_rank)[len(logs[kill_rank]):])
            assert killed, f"job {job}: rank {kill_rank} never reached hit {hit} of {point}: {tail}"
            assert returncode != 0, f"job {job}: torchrun did not see rank {kill_rank} die: {tail}"
        elif kill_after is not None:
            assert returncode in (0, -signal.SIGKILL), f"job {job} failed before our kill: {tail}"
        else:
            assert returncode == 0, f"the resume-only job failed: {tail}"
    assert resumed_a_checkpoint
