"""A 2-rank training job for the two-rank kill sweep, run under torchrun (ZeRO-2, so each rank saves its own
optimizer partition, and ``parallel_writers: "all"``, so both write shares of the model-states file): resumes
from SAVE_DIR, reports what it loaded, then trains and saves every step.

    python -m torch.distributed.run --nproc_per_node 2 tests/reliability/kill_child_two_ranks.py \
        SAVE_DIR LOG_DIR REPORT_DIR POINT HIT KILL_RANK STEPS

Each rank writes REPORT_DIR/rank<R>.json (its pid, and the step and state digest that load_checkpoint gave
it) and appends JSON lines to LOG_DIR/rank<R>.log, each fsynced before the job goes on:
``{"recorded": step, "digest": ...}`` before saving that step, ``{"saved": step}`` once the save returned,
``{"killing": POINT}`` just before the SIGKILL. With POINT other than "-", rank KILL_RANK SIGKILLs itself at
hit number HIT of that save point; otherwise the job runs until it has saved STEPS steps or the parent kills
it. STEPS 0 only resumes and reports.
"""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ds_fastckpt.faults import save_points  # noqa: E402
from tests.ds_helpers import full_state, init_engine, train  # noqa: E402


def digest(engine) -> str:
    """SHA-256 of every name, dtype, shape and byte of this rank's state: equal digests mean bit-exact."""
    sha = hashlib.sha256()
    for key, value in sorted(full_state(engine).items()):
        sha.update(key.encode())
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            sha.update(f"{value.dtype}{tuple(value.shape)}".encode())
            sha.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            sha.update(repr(value).encode())
    return sha.hexdigest()


def append_durably(log: Path, entry: dict) -> None:
    """One write() per line, so a SIGKILL leaves whole lines only; fsynced, as a record that must outlive us."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def main():
    save_dir, log_dir, report_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    point, hit, kill_rank, steps = sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    rank = int(os.environ["RANK"])
    log = log_dir / f"rank{rank}.log"
    engine = init_engine(2, {"keep_last": 2, "parallel_writers": "all"}, width=256)
    load_path, _ = engine.load_checkpoint(save_dir)
    report = {"pid": os.getpid(), "load_path": load_path, "step": engine.global_steps, "digest": digest(engine)}
    # Renamed into place: the parent starts its random-moment clock when both reports exist, whole.
    (report_dir / f"rank{rank}.json.tmp").write_text(json.dumps(report))
    os.replace(report_dir / f"rank{rank}.json.tmp", report_dir / f"rank{rank}.json")
    if point != "-" and rank == kill_rank:
        hits = {point: 0}

        def die_at(reached):
            if reached == point:
                hits[point] += 1
                if hits[point] == hit:
                    append_durably(log, {"killing": point})
                    os.kill(os.getpid(), signal.SIGKILL)

        save_points.on_reached(die_at)
    for _ in range(steps):
        train(engine, 1)
        append_durably(log, {"recorded": engine.global_steps, "digest": digest(engine)})
        engine.save_checkpoint(save_dir)
        append_durably(log, {"saved": engine.global_steps})
    engine.destroy()


if __name__ == "__main__":
    main()
