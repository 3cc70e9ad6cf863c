"""Run under torchrun with 4 ranks as a simulated 2-node job: ranks 0-1 on host "node0", 2-3 on "node1".

    python -m torch.distributed.run --nproc_per_node 4 tests/engine/two_node_worker.py OUT_DIR

Each rank enters a UTS namespace of its own (root only) and names its host, so ``socket.gethostname()``
differs between the two pairs as it would on two machines; LOCAL_RANK is 0 or 1 within each pair. With
``use_node_local_storage`` each node saves into its own directory, OUT_DIR/<mode>/node<N> (its "local disk"),
with ``parallel_writers`` "off", then left out (its default: "node" with node-local storage). Writes what each rank observed to OUT_DIR/rank<R>.json.
"""

import ctypes
import json
import os
import sys
from pathlib import Path

CLONE_NEWUTS = 0x04000000


def become_node(node: int) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    name = f"node{node}".encode()
    if libc.unshare(CLONE_NEWUTS) != 0 or libc.sethostname(name, len(name)) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)/sethostname")
    return name.decode()


def main():
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    node = rank // 2
    host = become_node(node)
    os.environ["LOCAL_RANK"] = str(rank % 2)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

    import deepspeed
    import torch.distributed as dist

    import ds_fastckpt  # noqa: F401  (the import is the wiring)
    from tests.ds_helpers import ds_config, full_state, make_model, train
    from tests.engine.parallel_worker import WIDTH, capture_single_writer_bytes, same_state, write_bytes
    from tests.zip_records import same_records

    def engine(fast_aio, seed=0):
        config = ds_config(1, fast_aio)
        config["checkpoint"]["use_node_local_storage"] = True
        model = make_model(seed, WIDTH)
        return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]

    def saves(mode: str) -> dict:
        save_dir = out / mode / f"node{node}"
        saver = engine({"keep_last": 1} if mode == "default" else {"keep_last": 1, "parallel_writers": mode})
        captured = []
        capture_single_writer_bytes(saver, captured)
        written = []
        for _ in range(2):
            train(saver, 1)
            before = write_bytes()
            saver.save_checkpoint(save_dir)
            written.append(write_bytes() - before)
        saved = full_state(saver)
        saver.destroy()
        dist.barrier()
        newest = save_dir / "global_step2"
        manifest = json.loads((newest / "ds_fastckpt_manifest.json").read_text())
        loader = engine({"verify": "checksum"}, seed=7)
        load_path, _ = loader.load_checkpoint(save_dir)
        model_states = (newest / "mp_rank_00_model_states.pt").read_bytes()
        return {"written": written, "writes_in_parallel": saver.checkpoint_engine.writes_in_parallel,
                "identical": (model_states == captured[-1], same_records(model_states, captured[-1]))
                if captured else None,
                "manifest_hosts": sorted({record["host"] for record in manifest["files"]}),
                "manifest_files": sorted(record["path"] for record in manifest["files"]),
                "load_path": load_path, "resumed_exactly": same_state(saved, full_state(loader))}

    report = {"rank": rank, "host": host, "off": saves("off"), "default": saves("default")}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
