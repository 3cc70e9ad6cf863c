"""A DeepSpeed engine on CUDA saves through fast_aio (sync, and async with snapshots) and resumes bit-exactly."""

import pytest
import torch

import ds_fastckpt
from ds_fastckpt import FastAioCheckpointEngine
from ds_fastckpt.format.names import MANIFEST_NAME
from tests.ds_helpers import assert_same_state, full_state, init_engine

# bf16 weights with fp32 master weights and Adam states: what a GPU job checkpoints.
BF16 = {"bf16": {"enabled": True}}
MODES = {
    "sync": {"keep_last": 2},
    "async_snapshot": {"keep_last": 2, "async": True, "snapshot": True},
}


def train_on_gpu(engine, steps: int, seed: int = 1) -> None:
    """tests.ds_helpers.train with the batch on the engine's device and in its dtype."""
    generator = torch.Generator().manual_seed(seed + engine.global_steps)
    for _ in range(steps):
        batch = torch.randn(4, 16, generator=generator).to(engine.device, torch.bfloat16)
        loss = engine(batch).float().pow(2).mean()
        engine.backward(loss)
        engine.step()


def assert_on_gpu(state: dict) -> None:
    """The state holds bf16 weights and fp32 optimizer tensors on the GPU: the CUDA save path is exercised."""
    on_gpu = [value for value in state.values() if isinstance(value, torch.Tensor) and value.is_cuda]
    assert any(value.dtype == torch.bfloat16 for value in on_gpu)
    assert any(value.dtype == torch.float32 and value.numel() > 1 for value in on_gpu)


@pytest.mark.parametrize("mode", MODES)
def test_cuda_engine_resumes_bit_exactly(tmp_path, mode):
    saver = init_engine(1, MODES[mode], seed=0, **BF16)
    assert isinstance(saver.checkpoint_engine, FastAioCheckpointEngine)
    assert saver.device.type == "cuda"
    train_on_gpu(saver, 3)
    saver.save_checkpoint(tmp_path)
    saved = full_state(saver)
    assert_on_gpu(saved)
    if mode == "async_snapshot":
        train_on_gpu(saver, 2)  # training goes on while the snapshot is written; the checkpoint keeps step 3
        ds_fastckpt.wait(saver)
    assert (tmp_path / "latest").read_text() == "global_step3"
    assert (tmp_path / "global_step3" / MANIFEST_NAME).is_file()
    saver.destroy()

    loader = init_engine(1, {"keep_last": 2, "verify": "checksum"}, seed=7, **BF16)
    before = full_state(loader)
    assert any(not torch.equal(saved[key], before[key]) for key in saved if key.startswith("module."))
    load_path, _ = loader.load_checkpoint(tmp_path)
    assert load_path is not None and "global_step3" in load_path
    assert_same_state(saved, full_state(loader))
    loader.destroy()

    default = init_engine(1, seed=11, engine=None, **BF16)  # DeepSpeed's own engine reads the same files
    assert type(default.checkpoint_engine).__name__ == "TorchCheckpointEngine"
    load_path, _ = default.load_checkpoint(tmp_path)
    assert load_path is not None and "global_step3" in load_path
    assert_same_state(saved, full_state(default))
    default.destroy()


def test_model_file_loads_onto_the_gpu_with_torch_load(tmp_path):
    engine = init_engine(1, MODES["sync"], seed=0, **BF16)
    train_on_gpu(engine, 1)
    engine.save_checkpoint(tmp_path)
    expected = {name: param.detach().clone() for name, param in engine.module.named_parameters()}
    engine.destroy()
    states = torch.load(tmp_path / "global_step1" / "mp_rank_00_model_states.pt", map_location="cuda",
                        weights_only=False)
    assert expected.keys() <= states["module"].keys()
    for name, param in expected.items():
        loaded = states["module"][name]
        assert loaded.is_cuda and loaded.dtype == torch.bfloat16
        assert torch.equal(loaded, param), name
