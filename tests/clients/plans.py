"""Client jobs under torchrun: a worker runs the named jobs of a plan and writes one JSON report per rank.

The test side (``run_plan``, ``job``) and the worker side (``run_jobs``, ``zero2_state``) of the HF Trainer and
accelerate tests.
"""

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Tuple

REPO = Path(__file__).resolve().parents[2]
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def run_plan(worker: Path, plan: str, out: Path, processes: int, drop_env: Tuple[str, ...] = ()
             ) -> subprocess.CompletedProcess:
    """Runs ``worker PLAN OUT`` under torchrun on ``processes`` local ranks, offline; prints how long it took."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for name in _LAUNCHER_ENV + drop_env:
        env.pop(name, None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                             "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
                             str(worker), plan, str(out)], env=env, capture_output=True, text=True, timeout=600)
    print(f"\nplan {plan} on {processes} process(es): {time.monotonic() - started:.0f} s")
    return result


def job(report: dict, name: str) -> dict:
    """One job's result; a job that raised fails the test with the worker's traceback."""
    result = report["jobs"][name]
    assert "error" not in result, f"{name} raised on rank {report['rank']}: {result['error']}\n{result['traceback']}"
    return result


def run_jobs(jobs: Iterable[Tuple[str, Callable[[], dict]]], report: dict, report_path: Path) -> None:
    """In a worker: runs each job, recording its result or its error, and rewrites the report after each."""
    for name, run in jobs:
        try:
            report["jobs"][name] = run()
        except Exception as error:
            traceback.print_exc()
            report["jobs"][name] = {"error": f"{type(error).__name__}: {error}",
                                    "traceback": traceback.format_exc()[-4000:]}
        report_path.write_text(json.dumps(report, indent=1, default=str))


def zero2_state(engine) -> dict:
    """The module's and the optimizer's tensors (ZeRO-2: whole parameters, this rank's fp32 partition and moments)."""
    import torch

    state = {f"module.{name}": tensor.detach().clone() for name, tensor in engine.module.state_dict().items()}
    for index, partition in enumerate(engine.optimizer.single_partition_of_fp32_groups):
        state[f"fp32.{index}"] = partition.detach().clone()
    for index, per_param in enumerate(engine.optimizer.optimizer.state.values()):
        for key, value in per_param.items():
            if torch.is_tensor(value):
                state[f"optim.{index}.{key}"] = value.detach().clone()
    return state
