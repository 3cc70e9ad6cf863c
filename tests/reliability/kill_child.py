"""A training job for the kill sweep: resumes from SAVE_DIR, then trains and saves every step.

    python tests/reliability/kill_child.py SAVE_DIR STARTED_FILE POINT HIT ASYNC STEPS

With POINT other than "-", the process SIGKILLs itself at hit number HIT of
that save point; otherwise it runs until the parent kills it.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ds_fastckpt.faults import save_points  # noqa: E402
from tests.ds_helpers import init_engine, single_process_env, train  # noqa: E402


def main():
    save_dir, started, point, hit = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    async_save, steps = sys.argv[5] == "1", int(sys.argv[6])
    single_process_env()
    engine = init_engine(1, {"keep_last": 2, "async": async_save}, width=256)
    engine.load_checkpoint(save_dir)
    if point != "-":
        hits = {point: 0}

        def die_at(reached):
            if reached == point:
                hits[point] += 1
                if hits[point] == hit:
                    os.kill(os.getpid(), signal.SIGKILL)

        save_points.on_reached(die_at)
    started.touch()
    for _ in range(steps):
        train(engine, 1)
        engine.save_checkpoint(save_dir)
    engine.destroy()


if __name__ == "__main__":
    main()
