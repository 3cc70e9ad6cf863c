"""snapshot_max_bytes bounds the host memory one checkpoint's snapshots take, to the byte."""

import logging

import torch

import ds_fastckpt
from ds_fastckpt.engine import background
from ds_fastckpt.native.file_part import FilePart
from ds_fastckpt.native.layout_save import Layout
from tests.ds_helpers import full_state, init_engine, train

ASYNC_SNAPSHOT = {"keep_last": 0, "async": True, "snapshot": True}


def snapshot_sizes(monkeypatch):
    """The host bytes of every snapshot the engine takes, in order."""
    sizes = []
    real = background.snapshot

    def recorded(state_dict, limit_bytes=0):
        copy = real(state_dict, limit_bytes)
        sizes.append(copy.storage_bytes if isinstance(copy, (Layout, FilePart)) else len(copy))
        return copy

    monkeypatch.setattr(background, "snapshot", recorded)
    return sizes


def test_a_budget_used_up_exactly_leaves_no_room_for_the_next_file(tmp_path, monkeypatch, caplog):
    """Before: with 0 bytes left the next file was snapshotted with no limit at all."""
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    sizes = snapshot_sizes(monkeypatch)
    unbounded = init_engine(1, ASYNC_SNAPSHOT)
    train(unbounded, 1)
    unbounded.save_checkpoint(tmp_path / "unbounded")
    ds_fastckpt.wait(unbounded)
    unbounded.destroy()
    assert len(sizes) == 2 and all(sizes), sizes  # the model states, then the optimizer states
    first = sizes[0]

    sizes.clear()
    engine = init_engine(1, {**ASYNC_SNAPSHOT, "snapshot_max_bytes": first})
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "bounded")
    saved = full_state(engine)
    assert sizes == [first], f"snapshots of {sizes} bytes with snapshot_max_bytes={first}"
    assert f"0 bytes left of snapshot_max_bytes={first}; writing this file now" in caplog.text
    with torch.no_grad():
        for param in engine.module.parameters():
            param.add_(1.0)
    ds_fastckpt.wait(engine)
    loader = init_engine(1, {"keep_last": 0, "verify": "checksum"}, seed=7)
    loader.load_checkpoint(tmp_path / "bounded")
    assert torch.equal(full_state(loader)["module.0.weight"], saved["module.0.weight"])
    engine.destroy()
    loader.destroy()
