"""DeepSpeed's own tools as clients of fast_aio checkpoints.

- zero_to_fp32 (the script DeepSpeed copies into save_dir, and the library call) on 2-rank ZeRO-2 and
  ZeRO-3 checkpoints saved through fast_aio: the fp32 weights the job held at save time, bit for bit.
- ds_to_universal on 2-rank fast_aio checkpoints, then a 1-process job with ``load_universal`` resuming
  without a tag: it must load what ``latest_universal`` names, also when newer fast_aio checkpoints exist.
- plain DeepSpeed (a process that never imports ds_fastckpt, ``"checkpoint": {}``) loading a fast_aio
  save_dir: the saved state, bit for bit.

One torchrun job (ds_tools_worker.py save) writes every 2-rank checkpoint and what the job held at each save.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.clients.ds_tools_worker import module_weights, snapshot
from tests.ds_helpers import assert_same_state, ds_config, free_port, full_state, init_engine, make_model, train

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "clients" / "ds_tools_worker.py"
PARAMS = {"0.weight", "0.bias", "2.weight", "2.bias"}  # make_model's parameters, as zero_to_fp32 names them
UNIVERSAL_TAG = "global_step3_universal"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in DIST_VARS:
        env.pop(name, None)
    env.update(extra)
    return env


def run(args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(arg) for arg in args], capture_output=True, text=True, timeout=timeout, **kwargs)


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"exit status {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"


def assert_same_tensors(expected: dict, actual: dict, what: str) -> None:
    assert set(actual) == set(expected), what
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, (what, name)
        assert torch.equal(actual[name], tensor), (what, name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """OUT with zero2/ (global_step3), zero2_newer/ (global_step3, global_step5), zero3/ (global_step3),
    all saved by a 2-rank job through fast_aio, and <dir>_step<N>.pt: what that job held at each save."""
    out = tmp_path_factory.mktemp("ds_tools")
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                  "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", WORKER, "save", out],
                 timeout=600, env=child_env())
    assert result.returncode == 0, output_of(result)
    return out


def expected(saved: Path, name: str) -> dict:
    return torch.load(saved / f"{name}.pt", weights_only=True)


@pytest.fixture(scope="module")
def universal(saved):
    """ds_to_universal run by its documented command line on global_step3 of each 2-rank save_dir."""
    results = {}
    for name in ("zero2", "zero2_newer", "zero3"):
        tag_dir = saved / name / "global_step3"
        results[name] = run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
                             "--output_folder", saved / name / UNIVERSAL_TAG, "--inject_missing_state"],
                            env=child_env())
    return results


def universal_engine(stage: int, seed: int = 7, load_universal: bool = True):
    """A fresh 1-process engine of the 2-rank jobs' model with fast_aio (and ``load_universal``)."""
    import deepspeed

    import ds_fastckpt  # noqa: F401  (the import is the wiring)

    config = ds_config(stage, {"keep_last": 0})
    if load_universal:
        config["checkpoint"]["load_universal"] = True
    model = make_model(seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def assert_same_snapshot(expected_state: dict, actual: dict) -> None:
    assert actual["global_steps"] == expected_state["global_steps"]
    for key in ("weights", "fp32", "exp_avg", "exp_avg_sq"):
        assert_same_tensors(expected_state[key], actual[key], key)


def differs(first: dict, second: dict) -> bool:
    return any(not torch.equal(first[name], second[name]) for name in first)


# zero_to_fp32 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_to_fp32_script_in_save_dir_gives_the_saved_fp32_weights(saved, name, tmp_path):
    save_dir = saved / name
    held = expected(saved, f"{name}_step3")
    assert json.loads((save_dir / "global_step3" / "ds_fastckpt_manifest.json").read_text())["world_size"] == 2
    script = save_dir / "zero_to_fp32.py"
    assert script.is_file()  # DeepSpeed copies it into save_dir; the fast_aio commit and rotation leave it there

    result = run([sys.executable, script, save_dir, tmp_path / "fp32"], env=child_env())

    assert result.returncode == 0, output_of(result)
    assert "world_size: 2" in result.stdout
    assert sorted(p.name for p in (tmp_path / "fp32").iterdir()) == ["pytorch_model.bin"]
    weights = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=True)
    assert_same_tensors(held["fp32"], weights, "fp32 master weights")
    assert_same_tensors(held["weights"], weights, "module weights")
    assert differs(held["weights"], dict(make_model(0).named_parameters()))  # trained: not the initial weights


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_get_fp32_state_dict_from_zero_checkpoint_gives_the_saved_fp32_weights(saved, name):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    held = expected(saved, f"{name}_step3")

    weights = get_fp32_state_dict_from_zero_checkpoint(str(saved / name))

    assert_same_tensors(held["fp32"], weights, "fp32 master weights")
    assert_same_tensors(held["weights"], weights, "module weights")


# ds_to_universal and load_universal --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_ds_to_universal_converts_a_two_rank_fast_aio_checkpoint(saved, universal, name):
    result = universal[name]
    held = expected(saved, f"{name}_step3")

    assert result.returncode == 0, output_of(result)
    assert (saved / name / "latest_universal").read_text() == UNIVERSAL_TAG
    assert (saved / name / "latest").read_text() == "global_step3"  # fast_aio's own pointer is untouched
    zero = saved / name / UNIVERSAL_TAG / "zero"
    assert {p.name for p in zero.iterdir() if p.is_dir()} == PARAMS
    for param in PARAMS:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            stored = torch.load(zero / param / f"{key}.pt", weights_only=True)
            stored = stored["param"] if isinstance(stored, dict) else stored  # ZeRO-3: a bare tensor, flattened
            assert torch.equal(stored.flatten(), held[key][param].flatten()), (param, key)


@pytest.mark.parametrize("stage", [2, 3])
def test_load_universal_without_tag_loads_what_latest_universal_names_into_one_process(saved, universal, stage):
    name = f"zero{stage}"
    assert universal[name].returncode == 0, output_of(universal[name])
    held = expected(saved, f"{name}_step3")
    engine = universal_engine(stage)
    assert differs(held["weights"], module_weights(engine))

    load_path, _ = engine.load_checkpoint(str(saved / name))

    assert load_path is not None and Path(load_path).parent == saved / name / UNIVERSAL_TAG
    assert engine.global_steps == 3
    assert_same_snapshot(held, snapshot(engine))
    engine.destroy()


def test_load_universal_without_tag_ignores_newer_fast_aio_checkpoints(saved, universal):
    save_dir = saved / "zero2_newer"
    assert universal["zero2_newer"].returncode == 0, output_of(universal["zero2_newer"])
    assert (save_dir / "latest").read_text() == "global_step5"  # newer than the converted global_step3
    assert (save_dir / "global_step5" / "ds_fastckpt_manifest.json").is_file()
    held, newer = expected(saved, "zero2_step3"), expected(saved, "zero2_step5")
    assert differs(held["weights"], newer["weights"])
    engine = universal_engine(2)

    load_path, _ = engine.load_checkpoint(str(save_dir))

    assert load_path is not None and Path(load_path).parent == save_dir / UNIVERSAL_TAG
    assert engine.global_steps == 3
    assert_same_snapshot(held, snapshot(engine))
    engine.destroy()


def test_load_universal_with_explicit_tag(saved, universal):
    assert universal["zero2"].returncode == 0, output_of(universal["zero2"])
    engine = universal_engine(2)

    load_path, _ = engine.load_checkpoint(str(saved / "zero2"), tag=UNIVERSAL_TAG)

    assert load_path is not None and Path(load_path).parent == saved / "zero2" / UNIVERSAL_TAG
    assert_same_snapshot(expected(saved, "zero2_step3"), snapshot(engine))
    engine.destroy()


def test_resume_without_load_universal_still_takes_the_newest_fast_aio_checkpoint(saved, universal):
    """The universal folder and latest_universal in save_dir do not change a plain fast_aio resume."""
    assert universal["zero2_newer"].returncode == 0, output_of(universal["zero2_newer"])
    engine = universal_engine(2, load_universal=False)

    # 1 process from a 2-rank ZeRO-2 save: DeepSpeed loads the weights only (the optimizer partitions need 2 ranks).
    load_path, _ = engine.load_checkpoint(str(saved / "zero2_newer"), load_optimizer_states=False)

    assert load_path is not None and Path(load_path).parent == saved / "zero2_newer" / "global_step5"
    assert engine.global_steps == 5
    assert_same_tensors(expected(saved, "zero2_step5")["weights"], module_weights(engine), "module weights")
    engine.destroy()


# plain DeepSpeed, no plugin ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [1, 3])
def test_plain_deepspeed_without_the_plugin_loads_a_fast_aio_checkpoint(tmp_path, stage):
    save_dir = tmp_path / "ckpt"
    saver = init_engine(stage, {"keep_last": 0}, seed=0)
    train(saver, 3)
    saver.save_checkpoint(save_dir)
    held = full_state(saver)
    saver.destroy()
    assert json.loads((save_dir / "global_step3" / "ds_fastckpt_manifest.json").read_text())["step"] == 3

    out_file = tmp_path / "loaded.pt"
    result = run([sys.executable, WORKER, "plain-load", stage, save_dir, out_file],
                 env=child_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(free_port())))

    assert result.returncode == 0, output_of(result)
    loaded = torch.load(out_file, weights_only=False)
    assert loaded["ds_fastckpt_imported"] is False
    assert loaded["checkpoint_engine"] == "TorchCheckpointEngine"
    assert Path(loaded["load_path"]).parent == save_dir / "global_step3"
    assert differs({k: v for k, v in held.items() if k.startswith("module.")}, loaded["before"])
    assert_same_state(held, loaded["after"])
