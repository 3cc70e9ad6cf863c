"""One rank of a 2-rank job started without torchrun (so no agent tears the survivor down when a rank dies).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python rank_failure_worker.py SAVE_DIR OUT MODE

MODE "kill" or "stop": save global_step1, train a step, then save again;
rank 1 SIGKILLs or SIGSTOPs itself right after writing its first file of that
save (killed: its share of the model-states file, as both ranks write it with
``parallel_writers: "all"``; stopped: its optimizer partition, with one writer
per file), and rank 0 writes what its save_checkpoint raised to OUT/rank0.json. MODE
"resume": load the newest checkpoint, compare with what the first job saved,
save once more, and write OUT/resume_rank<r>.json.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from ds_fastckpt.faults import save_points  # noqa: E402
from tests.ds_helpers import full_state, init_engine, train  # noqa: E402

COMMIT_TIMEOUT_S = 15


def same_state(expected: dict, actual: dict) -> bool:
    return expected.keys() == actual.keys() and all(
        torch.equal(value, actual[key]) if isinstance(value, torch.Tensor) else value == actual[key]
        for key, value in expected.items())


def fail_mid_save(engine, save_dir: Path, out: Path, rank: int, signum: int) -> None:
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    torch.save(full_state(engine), out / f"saved_rank{rank}.pt")
    train(engine, 1)
    if rank == 1:
        save_points.on_reached(lambda point: point == "after_file_write" and os.kill(os.getpid(), signum))
        engine.save_checkpoint(save_dir)
        return
    started = time.monotonic()
    try:
        engine.save_checkpoint(save_dir)
        raised = None
    except Exception as error:
        raised = {"type": type(error).__name__, "message": str(error)}
    (out / "rank0.json").write_text(json.dumps({"raised": raised, "seconds": time.monotonic() - started}))
    os._exit(0)  # the process group is broken: tearing it down would wait for the lost rank


def resume(engine, save_dir: Path, out: Path, rank: int) -> None:
    load_path, _ = engine.load_checkpoint(save_dir)
    expected = torch.load(out / f"saved_rank{rank}.pt", weights_only=False)
    report = {"load_path": load_path, "same_state": same_state(expected, full_state(engine))}
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    engine.destroy()
    (out / f"resume_rank{rank}.json").write_text(json.dumps(report))


def main():
    save_dir, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["RANK"])
    parallel_writers = "all" if mode in ("kill", "resume") else "off"
    engine = init_engine(2, {"keep_last": 2, "commit_timeout_s": COMMIT_TIMEOUT_S,
                             "parallel_writers": parallel_writers})
    if mode == "resume":
        resume(engine, save_dir, out, rank)
    else:
        fail_mid_save(engine, save_dir, out, rank, {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[mode])


if __name__ == "__main__":
    main()
