"""Run under torchrun: a job that replicates to the remote tier, then (phase "resume") a job that resumes from it.

    python -m torch.distributed.run --nproc_per_node N tests/remote/node_loss_worker.py OUT_DIR

The environment says how: ``NODE_LOSS_PHASE`` ("save" or "resume"), ``NODE_LOSS_URL`` (the remote tier),
``NODE_LOSS_ENDPOINT`` (the S3 endpoint, empty for a shared-filesystem url) and ``NODE_LOSS_NODES``: with "2",
the 4 ranks are two simulated nodes (UTS namespaces, as in tests/engine/two_node_worker.py) with
``use_node_local_storage``, each saving into OUT_DIR/node<N>; with "1" all ranks share OUT_DIR/shared.

"save": 2 saves of ZeRO-1 with ``keep_last`` 1 (the first is rotated away locally, kept remotely);
``ds_fastckpt.wait_all()``; each rank writes its full state to OUT_DIR/saved<R>.pt.
"resume": a fresh engine (other seed) loads the save_dir without a tag; each rank writes OUT_DIR/rank<R>.json
with the path loaded, the client_state, and whether its state is the saved one bit for bit.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

WIDTH = 4096


def main():
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    nodes = int(os.environ["NODE_LOSS_NODES"])
    if nodes == 2:
        from tests.engine.two_node_worker import become_node

        become_node(rank // 2)
        os.environ["LOCAL_RANK"] = str(rank % 2)
        os.environ["LOCAL_WORLD_SIZE"] = "2"
    save_dir = out / (f"node{rank // 2}" if nodes == 2 else "shared")

    import deepspeed
    import torch

    import ds_fastckpt
    from tests.ds_helpers import ds_config, full_state, make_model, train
    from tests.engine.parallel_worker import same_state

    replicate = {"url": os.environ["NODE_LOSS_URL"], "request_timeout_s": 10, "wait_timeout_s": 120}
    if os.environ.get("NODE_LOSS_ENDPOINT"):
        replicate["endpoint_url"] = os.environ["NODE_LOSS_ENDPOINT"]

    def engine(seed: int, **options):
        config = ds_config(1, {"keep_last": 1, "replicate": replicate, **options})
        config["checkpoint"]["use_node_local_storage"] = nodes == 2
        model = make_model(seed, WIDTH)
        return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]

    if os.environ["NODE_LOSS_PHASE"] == "save":
        saver = engine(0)
        train(saver, 1)
        saver.save_checkpoint(save_dir, client_state={"epoch": 1})
        train(saver, 1)
        saver.save_checkpoint(save_dir, client_state={"epoch": 2})
        torch.save(full_state(saver), out / f"saved{rank}.pt")
        ds_fastckpt.wait_all()
        saver.destroy()
        (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank}))
        return
    loader = engine(7, verify="checksum")
    path, client_state = loader.load_checkpoint(save_dir)
    saved = torch.load(out / f"saved{rank}.pt", weights_only=False)
    report = {"rank": rank, "path": path, "epoch": (client_state or {}).get("epoch"),
              "resumed_exactly": same_state(saved, full_state(loader)),
              "local_tags": sorted(p.name for p in save_dir.iterdir() if p.name.startswith("global_step"))}
    loader.destroy()
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
