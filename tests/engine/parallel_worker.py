"""Run under torchrun with 2 ranks: ZeRO-1 saves with ``parallel_writers`` "off", left out (its default, "all"
on shared storage) and "all" with async snapshots; what each rank wrote and what the files hold, written as
JSON per rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/parallel_worker.py OUT_DIR
"""

import io
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ds_fastckpt  # noqa: E402
from ds_fastckpt.native.op import load_op  # noqa: E402
from ds_fastckpt.native.writer import torch_zip_crc32  # noqa: E402
from tests.ds_helpers import full_state, init_engine, train  # noqa: E402
from tests.engine.two_rank_worker import failing_write_on_one_rank  # noqa: E402
from tests.zip_records import same_records  # noqa: E402

WIDTH = 32768  # model states of about 2.3 MB; each rank's optimizer partition about as much
MODEL_STATES = "mp_rank_00_model_states.pt"


def write_bytes() -> int:
    """Bytes this process (all its threads) has sent to the storage layer, from /proc/self/io."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no write_bytes")


def same_state(expected, actual) -> bool:
    return expected.keys() == actual.keys() and all(
        torch.equal(value, actual[key]) if isinstance(value, torch.Tensor) else value == actual[key]
        for key, value in expected.items())


def capture_single_writer_bytes(engine, captured: list) -> None:
    """Records what one writer alone would write for the model-states file: torch.save of the same state."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.save

    def save(state_dict, path):
        if Path(path).name == MODEL_STATES:
            buffer = io.BytesIO()
            with torch_zip_crc32(False):
                torch.save(state_dict, buffer)
            captured.append(buffer.getvalue())
        return original(state_dict, path)

    checkpoint_engine.save = save


def saves(save_dir: Path, rank: int, mode: str, async_save: bool) -> dict:
    """Three saves (keep_last 1, so the third writes over the first one's spare), then a resume in a new engine."""
    options = {"keep_last": 1, "async": async_save, "snapshot": async_save}
    if mode != "default":
        options["parallel_writers"] = mode
    engine = init_engine(1, options, width=WIDTH)
    captured = []
    capture_single_writer_bytes(engine, captured)
    written, identical, spare_inode, inode = [], [], None, None
    for _ in range(3):
        train(engine, 1)
        if engine.global_steps == 3:
            spares = list(save_dir.glob(f".*.ds_fastckpt-spare/{MODEL_STATES}"))
            spare_inode = spares[0].stat().st_ino if spares else None
        before = write_bytes()
        engine.save_checkpoint(save_dir)
        ds_fastckpt.wait(engine)
        written.append(write_bytes() - before)
        dist.barrier()
        final = save_dir / f"global_step{engine.global_steps}" / MODEL_STATES
        if rank == 0:
            identical.append((final.read_bytes() == captured[-1], same_records(final.read_bytes(), captured[-1])))
        inode = final.stat().st_ino
    saved = full_state(engine)
    engine.destroy()
    manifest = json.loads((save_dir / "global_step3" / "ds_fastckpt_manifest.json").read_text())
    record = next(record for record in manifest["files"] if record["path"] == MODEL_STATES)
    data = (save_dir / "global_step3" / MODEL_STATES).read_bytes()
    loader = init_engine(1, {"verify": "checksum"}, seed=7, width=WIDTH)
    load_path, _ = loader.load_checkpoint(save_dir)
    return {"writes_in_parallel": engine.checkpoint_engine.writes_in_parallel, "written": written,
            "identical": identical, "recycled": spare_inode is not None and spare_inode == inode,
            "record": record, "crc32c": load_op().crc32c(data), "size": len(data), "load_path": load_path,
            "resumed_exactly": same_state(saved, full_state(loader))}


def main():
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    report = {"rank": rank}
    for mode in ("off", "default"):
        report[mode] = saves(out / mode, rank, mode, async_save=False)
    report["all_async"] = saves(out / "all_async", rank, "all", async_save=True)
    # Rank 1's first write is its share of the model-states file.
    report["failing_share"] = failing_write_on_one_rank(out / "failing_share", rank, async_save=False, stage=1,
                                                        width=WIDTH, parallel_writers="all")
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
