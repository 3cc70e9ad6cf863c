"""Run under torchrun with 2 ranks: save A, then B with save_latest=False; a fresh job resumes A, sync and async.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/resume_latest_worker.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch

from tests.ds_helpers import full_state, init_engine, train


def resumes_latest(save_dir: Path, async_save: bool) -> dict:
    saver = init_engine(1, {"keep_last": 2, "async": async_save}, seed=0)
    train(saver, 2)
    saver.save_checkpoint(save_dir, tag="chosen")
    chosen = full_state(saver)
    train(saver, 2)
    saver.save_checkpoint(save_dir, tag="side", save_latest=False)
    train(saver, 1)  # an async save commits at the next step
    saver.destroy()
    loader = init_engine(1, {"keep_last": 2, "verify": "checksum"}, seed=7)
    load_path, _ = loader.load_checkpoint(save_dir)
    loaded = full_state(loader)
    loader.destroy()
    return {"load_path": load_path, "global_steps": loaded.get("global_steps"),
            "bit_exact": chosen.keys() == loaded.keys() and all(
                torch.equal(value, loaded[key]) if isinstance(value, torch.Tensor) else value == loaded[key]
                for key, value in chosen.items()),
            "dirs": sorted(path.name for path in save_dir.iterdir())}


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "sync": resumes_latest(out / "sync", False),
              "async": resumes_latest(out / "async", True)}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
