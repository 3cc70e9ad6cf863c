"""SIGKILL a training job at named points of a save and at random moments; resume must never see a partial
checkpoint, and once a save has completed there must always be one.

``make test`` runs 24 kills, half of them with sync and half with async saves (DS_FASTCKPT_KILLS);
``make test-long`` runs 200. Even-numbered kills hit the named save points in turn (each once per mode
in ``make test``), odd ones a random moment after the job has started.
"""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_fastckpt.faults.save_points import POINTS
from ds_fastckpt.format.records import complete_checkpoints, scan
from tests.ds_helpers import full_state, init_engine, train

KILLS_PER_MODE = int(os.environ.get("DS_FASTCKPT_KILLS", "24")) // 2
STEPS_PER_CHILD = 6
CHILD = Path(__file__).resolve().parent / "kill_child.py"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference_states():
    """The state after each step of one uninterrupted run: what a checkpoint of that step must hold."""
    engine = init_engine(1, {"keep_last": 2}, width=256)
    states = {}
    for _ in range(KILLS_PER_MODE * STEPS_PER_CHILD + 10):
        train(engine, 1)
        states[engine.global_steps] = full_state(engine)
    return states


def run_child(save_dir: Path, started: Path, point: str, hit: int, async_save: bool, kill_after: float):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    started.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, str(CHILD), str(save_dir), str(started), point, str(hit),
                              "1" if async_save else "0", str(STEPS_PER_CHILD)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    if point == "-":
        deadline = time.monotonic() + 240
        while not started.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(kill_after)
        child.kill()
    _, stderr = child.communicate(timeout=300)
    assert child.returncode in (-9, 0), stderr.decode()[-3000:]


def assert_resumes_exactly(save_dir: Path, reference_states, async_save: bool):
    engine = init_engine(1, {"keep_last": 2, "verify": "checksum"}, width=256, seed=11)
    load_path, _ = engine.load_checkpoint(save_dir)
    if not complete_checkpoints(scan(save_dir)):
        assert load_path is None
        return False
    assert load_path is not None
    expected = reference_states[engine.global_steps]
    loaded = full_state(engine)
    assert expected.keys() == loaded.keys()
    for key, value in expected.items():
        assert torch.equal(value, loaded[key]) if isinstance(value, torch.Tensor) else value == loaded[key], key
    return True


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_sweep(tmp_path, reference_states, async_save):
    rng = random.Random(1234 + async_save)
    save_dir = tmp_path / "ckpts"
    ever_complete, kills = False, 0
    for kill in range(KILLS_PER_MODE):
        if kill % 2 == 0:
            point, hit, delay = POINTS[(kill // 2) % len(POINTS)], rng.randint(1, 3), 0.0
        else:
            point, hit, delay = "-", 0, rng.uniform(0.0, 0.6)
        run_child(save_dir, tmp_path / "started", point, hit, async_save, delay)
        complete = assert_resumes_exactly(save_dir, reference_states, async_save)
        assert complete or not ever_complete, f"kill {kill} at {point}: the last complete checkpoint was lost"
        ever_complete = ever_complete or complete
        kills += 1
    assert ever_complete and kills == KILLS_PER_MODE
