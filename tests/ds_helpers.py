"""Small DeepSpeed jobs on CPU for the engine tests: one process here, two under torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import torch

REPO = Path(__file__).resolve().parents[1]


def deepspeed_scripts() -> List[str]:
    """The conversion scripts DeepSpeed copies into save_dir at each save: zero_to_fp32.py, and zero_to_torch.py
    from 0.19.7 on."""
    import deepspeed

    return sorted(path.name for path in (Path(deepspeed.__file__).parent / "utils").glob("zero_to_*.py"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_reports(worker: Path, out: Path, ranks: int) -> List[dict]:
    """Runs ``worker OUT`` under torchrun on ``ranks`` local ranks and returns each rank's OUT/rank<R>.json.

    Fails the test with the end of torchrun's output when the job fails.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                             "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
                             str(worker), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(ranks)]


def single_process_env() -> None:
    """Lets deepspeed.initialize run as a world of one in this process (gloo on CPU)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def make_model(seed: int, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 8))


def ds_config(stage: int, fast_aio=None, engine="fast_aio", **extra):
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {},
    }
    if engine is not None:
        config["checkpoint"]["engine"] = engine
    if fast_aio is not None:
        config["checkpoint"]["fast_aio"] = fast_aio
    config.update(extra)
    return config


def init_engine(stage: int = 1, fast_aio=None, seed: int = 0, engine="fast_aio", width: int = 32, **extra):
    import deepspeed

    import ds_fastckpt  # noqa: F401  (the import is the wiring)

    model = make_model(seed, width)
    ds_engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                         config=ds_config(stage, fast_aio, engine, **extra))
    return ds_engine


def train(engine, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed + engine.global_steps)
    for _ in range(steps):
        batch = torch.randn(4, 16, generator=generator)
        loss = engine(batch).pow(2).mean()
        engine.backward(loss)
        engine.step()


def save_twice(engine, save_dir) -> dict:
    """Trains and saves two steps, then destroys the engine; returns the state of the first (older) save."""
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    older = full_state(engine)
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    engine.destroy()
    return older


def full_state(engine) -> dict:
    """Every tensor and number of module and optimizer state, flattened, gathered under ZeRO-3."""
    import deepspeed

    flat = {}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                           enabled=engine.zero_optimization_stage() == 3):
        for name, param in engine.module.named_parameters():
            flat[f"module.{name}"] = param.detach().clone()
    _flatten("optimizer", engine.optimizer.state_dict(), flat)
    flat["global_steps"] = engine.global_steps
    return flat


def _flatten(prefix, value, out):
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten(f"{prefix}.{index}", item, out)
    elif isinstance(value, torch.Tensor):
        out[prefix] = value.detach().clone()
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out[prefix] = value


def assert_same_state(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, actual[key]), key
        else:
            assert value == actual[key], key
