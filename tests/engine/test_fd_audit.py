"""The fd audit sees what DeepSpeed < 0.19.1 leaked: a descriptor per save, pinning deleted checkpoints."""

import logging

import pytest

from ds_fastckpt import FdLeakError
from tests.ds_helpers import init_engine, train


def test_clean_saves_report_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    engine = init_engine(1, {"keep_last": 1, "fd_audit": "warn"})
    for _ in range(3):
        train(engine, 1)
        engine.save_checkpoint(tmp_path)
    assert not [r for r in caplog.records if "file descriptors" in r.getMessage()]


def test_raise_lists_the_leaked_fds(tmp_path, leaky_writer):
    engine = init_engine(1, {"keep_last": 1, "fd_audit": "raise"})
    train(engine, 1)
    with pytest.raises(FdLeakError) as raised:
        engine.save_checkpoint(tmp_path)
    for fd in leaky_writer:
        assert f"fd {fd} -> {tmp_path}/global_step1/" in str(raised.value)


def test_warn_shows_deleted_checkpoints_pinned_by_leaks(tmp_path, leaky_writer, caplog):
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    # Without recycling, so that the rotation unlinks global_step1 (a spare is never written over while our
    # leaked descriptors hold it open, but it stays on disk until the next rotation).
    engine = init_engine(1, {"keep_last": 1, "fd_audit": "warn", "recycle_retired": False})
    for _ in range(2):
        train(engine, 1)
        engine.save_checkpoint(tmp_path)
    last = [r.getMessage() for r in caplog.records if "file descriptors" in r.getMessage()][-1]
    assert "global_step1" in last and "(deleted)" in last
    assert not (tmp_path / "global_step1").exists()


def test_off_skips_the_audit(tmp_path, leaky_writer):
    engine = init_engine(1, {"keep_last": 1, "fd_audit": "off"})
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    assert leaky_writer
