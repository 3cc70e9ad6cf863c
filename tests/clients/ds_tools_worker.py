"""Checkpoints for tests/clients/test_deepspeed_tools.py, and plain DeepSpeed loading them.

Two modes:

    python -m torch.distributed.run --nproc_per_node 2 tests/clients/ds_tools_worker.py save OUT_DIR
        2-rank ZeRO-2 and ZeRO-3 jobs save through fast_aio into OUT_DIR/zero2, OUT_DIR/zero2_newer
        (the same step-3 checkpoint, then a newer one at step 5) and OUT_DIR/zero3; rank 0 dumps
        with torch.save what the job held at each save (OUT_DIR/<dir>_step<N>.pt, see `snapshot`).

    python tests/clients/ds_tools_worker.py plain-load STAGE SAVE_DIR OUT_FILE
        One process that never imports ds_fastckpt: deepspeed.initialize with "checkpoint": {} and
        load_checkpoint(SAVE_DIR); dumps full_state and what was loaded into OUT_FILE.
"""

import os
import sys
from pathlib import Path

import torch

from tests.ds_helpers import ds_config, full_state, make_model, train


def module_weights(engine) -> dict:
    """The module's full weights, gathered under ZeRO-3 (collective there)."""
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=engine.zero_optimization_stage() == 3):
        return {name: param.detach().clone() for name, param in params}


def snapshot(engine) -> dict:
    """Per parameter (names as zero_to_fp32 gives them): the module weight, the fp32 master weight and Adam's
    exp_avg / exp_avg_sq, each full size whatever the ZeRO stage and world size. Collective: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"weights": module_weights(engine), "fp32": {}, "exp_avg": {}, "exp_avg_sq": {},
           "global_steps": engine.global_steps}
    for name, param in engine.module.named_parameters():
        out["fp32"][name] = safe_get_full_fp32_param(param).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][name] = safe_get_full_optimizer_state(param, key).detach().clone()
    return out


def dump(engine, path: Path) -> None:
    state = snapshot(engine)
    if int(os.environ["RANK"]) == 0:
        torch.save(state, path)


def save(out: Path) -> None:
    from tests.ds_helpers import init_engine

    engine = init_engine(2, {"keep_last": 0}, seed=0)
    train(engine, 3)
    engine.save_checkpoint(out / "zero2")
    engine.save_checkpoint(out / "zero2_newer")
    dump(engine, out / "zero2_step3.pt")
    train(engine, 2)
    engine.save_checkpoint(out / "zero2_newer")
    dump(engine, out / "zero2_step5.pt")
    engine.destroy()

    engine = init_engine(3, {"keep_last": 0}, seed=0)
    train(engine, 3)
    engine.save_checkpoint(out / "zero3")
    dump(engine, out / "zero3_step3.pt")
    engine.destroy()


def plain_load(stage: int, save_dir: str, out_file: str) -> None:
    import deepspeed

    model = make_model(7)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, engine=None))
    before = full_state(engine)
    load_path, client_state = engine.load_checkpoint(save_dir)
    torch.save({"before": before, "after": full_state(engine), "load_path": load_path,
                "checkpoint_engine": type(engine.checkpoint_engine).__name__,
                "ds_fastckpt_imported": any(name.split(".")[0] == "ds_fastckpt" for name in sys.modules)}, out_file)


def main():
    if sys.argv[1] == "save":
        save(Path(sys.argv[2]))
    elif sys.argv[1] == "plain-load":
        plain_load(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")


if __name__ == "__main__":
    main()
