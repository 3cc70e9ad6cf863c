"""Run under torchrun with 2 ranks (ZeRO-1, ``parallel_writers`` left at its default, "all"): what the shared
model-states file holds when the ranks hold different bytes, and how a save whose ``client_state`` cannot be
pickled fails; written as JSON per rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/share_worker.py OUT_DIR differing|unpicklable

``differing``: a module's ``get_extra_state()`` tensor that differs between the ranks; a frozen parameter of
the same size but other bytes on each rank, as ``OptimizedLinear`` with ``base_weight_sharding`` keeps (marked
``ds_optim_param``, so DeepSpeed's ``_broadcast_model`` leaves it alone); and one DeepSpeed does not know about
(unmarked, so broadcast at initialize, then changed on each rank). Each in a model of its own, placed last so
that a split of all the module's bytes gives its tail to rank 1.

``unpicklable``: ``save_checkpoint(client_state={"f": lambda: 0})`` with ``parallel_writers`` "off" (the
control) and by default, with ``commit_timeout_s`` 300.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ds_fastckpt  # noqa: E402
from ds_fastckpt.native.op import load_op  # noqa: E402
from tests.ds_helpers import ds_config, train  # noqa: E402
from tests.engine.parallel_worker import MODEL_STATES, capture_single_writer_bytes  # noqa: E402

WIDTH = 8192  # about 0.8 MB of parameters every rank holds alike, ahead of the 1 MB tensor that differs
DIFFERING = 1 << 18  # float32 elements of the tensor that differs between the ranks: 1 MiB


def own_values(rank: int) -> torch.Tensor:
    """The tensor rank ``rank`` holds where the ranks differ."""
    return torch.arange(DIFFERING, dtype=torch.float32) + 1_000_000 * (rank + 1)


class RunningStats(torch.nn.Module):
    """Keeps per-rank statistics as extra state (``get_extra_state``), not as a buffer: running statistics,
    FP8 scaling metadata."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values

    def get_extra_state(self):
        return self.values

    def set_extra_state(self, state):
        self.values = state


class ShardedFrozen(torch.nn.Module):
    """This rank's shard of a frozen base weight, as ``OptimizedLinear`` with ``base_weight_sharding`` keeps it."""

    def __init__(self, values: torch.Tensor, marked: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(values, requires_grad=False)
        if marked:
            self.weight.ds_optim_param = True  # DeepSpeed's mark: not broadcast from rank 0 at initialize


class Model(torch.nn.Module):
    def __init__(self, differing: str, values: torch.Tensor):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(16, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 8))
        self.tail = RunningStats(values) if differing == "extra_state" else \
            ShardedFrozen(values, marked=differing == "sharded_frozen")

    def forward(self, batch):
        return self.body(batch)


def init(model: torch.nn.Module, **fast_aio):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_config(1, fast_aio),
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine


def tail_of(state: dict, differing: str) -> torch.Tensor:
    return state["tail._extra_state" if differing == "extra_state" else "tail.weight"]


def differing(save_dir: Path, rank: int, what: str) -> dict:
    """One save, then a resume into a new engine whose tail holds other values on each rank."""
    engine = init(Model(what, own_values(rank)), verify="checksum")
    if what == "diverged_frozen":  # initialize gave it rank 0's values; each rank changes it
        engine.module.tail.weight.data.copy_(own_values(rank))
    assert torch.equal(tail_of(engine.module.state_dict(), what), own_values(rank))
    captured = []
    capture_single_writer_bytes(engine, captured)
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    ds_fastckpt.wait(engine)
    dist.barrier()
    path = save_dir / "global_step1" / MODEL_STATES
    data = path.read_bytes()
    saved_tail = tail_of(torch.load(path, weights_only=False)["module"], what)
    manifest = json.loads((save_dir / "global_step1" / "ds_fastckpt_manifest.json").read_text())
    record = next(record for record in manifest["files"] if record["path"] == MODEL_STATES)
    body = {name: value.clone() for name, value in engine.module.state_dict().items() if name.startswith("body.")}
    writes_in_parallel = engine.checkpoint_engine.writes_in_parallel
    engine.destroy()
    loader = init(Model(what, torch.zeros(DIFFERING)), verify="checksum")
    load_path, _ = loader.load_checkpoint(save_dir)
    loaded = loader.module.state_dict()
    return {"writes_in_parallel": writes_in_parallel,
            "saved_tail_is_rank0s": torch.equal(saved_tail, own_values(0)),
            "saved_tail_differs_from_rank0s_at": (saved_tail != own_values(0)).nonzero().flatten()[:3].tolist(),
            "identical_to_leader_alone": rank == 0 and data == captured[-1],
            "record_crc_is_the_file_s": record["crc32c"] == load_op().crc32c(data),
            "load_path": load_path,
            "loaded_tail_is_rank0s": torch.equal(tail_of(loaded, what), own_values(0)),
            "loaded_body_is_the_saved": all(torch.equal(value, loaded[name]) for name, value in body.items())}


def unpicklable(save_dir: Path, rank: int, mode: str) -> dict:
    """A good save, a save whose client_state cannot be pickled (timed on this rank), then a good one."""
    options = {"keep_last": 3, "commit_timeout_s": 300}
    if mode != "default":
        options["parallel_writers"] = mode
    engine = init(Model("extra_state", own_values(0)), **options)
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    train(engine, 1)
    raised, started = None, time.monotonic()
    try:
        engine.save_checkpoint(save_dir, client_state={"f": lambda: 0})
    except Exception as error:
        raised = {"type": type(error).__name__, "module": type(error).__module__, "message": str(error)}
    seconds = time.monotonic() - started
    latest_after_failure = (save_dir / "latest").read_text()
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    writes_in_parallel = engine.checkpoint_engine.writes_in_parallel
    engine.destroy()
    return {"writes_in_parallel": writes_in_parallel, "raised": raised, "seconds": seconds,
            "latest_after_failure": latest_after_failure, "latest_after_next": (save_dir / "latest").read_text(),
            "dirs": sorted(path.name for path in save_dir.iterdir() if path.is_dir())}


def main():
    out, case = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    report = {"rank": rank}
    if case == "differing":
        for what in ("extra_state", "sharded_frozen", "diverged_frozen"):
            report[what] = differing(out / what, rank, what)
    else:
        for mode in ("off", "default"):
            report[mode] = unpicklable(out / mode, rank, mode)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
