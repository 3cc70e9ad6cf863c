"""The fd audit counts checkpoint files only: a job's own files open in save_dir are never a leak."""

import logging
import os
import shutil

import pytest

from ds_fastckpt import FdLeakError
from tests.ds_helpers import init_engine, train


def test_a_log_a_metrics_file_and_a_rotated_log_kept_open_in_save_dir_are_not_leaks(tmp_path):
    """Before: the first save raised FdLeakError naming train.log, and the training loop died."""
    engine = init_engine(1, {"keep_last": 1, "fd_audit": "raise"})
    (tmp_path / "runs").mkdir()
    log = open(tmp_path / "train.log", "a")
    metrics = open(tmp_path / "runs" / "metrics.csv", "w")
    rotated = open(tmp_path / "train.log.1", "w")
    os.unlink(tmp_path / "train.log.1")  # the job rotated its log and still writes to the old one
    try:
        for _ in range(3):
            train(engine, 1)
            engine.save_checkpoint(tmp_path)
            log.write("saved\n")
            log.flush()
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")) == \
            ["global_step3", "runs"]
    finally:
        for handle in (log, metrics, rotated):
            handle.close()
        engine.destroy()


def test_a_descriptor_to_a_checkpoint_file_still_fails_the_save_beside_the_users_files(tmp_path, leaky_writer):
    engine = init_engine(1, {"keep_last": 1, "fd_audit": "raise"})
    log = open(tmp_path / "train.log", "a")
    try:
        train(engine, 1)
        with pytest.raises(FdLeakError) as raised:
            engine.save_checkpoint(tmp_path)
        assert f"-> {tmp_path}/global_step1/" in str(raised.value)
        assert "train.log" not in str(raised.value)
    finally:
        log.close()
        engine.destroy()


def test_deleted_checkpoint_files_in_an_earlier_save_dir_still_count(tmp_path, monkeypatch, caplog):
    """A client saving each checkpoint into a new directory and deleting old ones itself (the HF Trainer):
    a descriptor pinning a deleted checkpoint file there still counts, a deleted file of the job's does not."""
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    engine = init_engine(1, {"keep_last": 0, "fd_audit": "warn"})
    first, second = tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"
    train(engine, 1)
    engine.save_checkpoint(first)
    pinned = os.open(first / "global_step1" / "mp_rank_00_model_states.pt", os.O_RDONLY)
    notes = open(first / "notes.txt", "w")
    try:
        shutil.rmtree(first)  # the client's own rotation
        train(engine, 1)
        engine.save_checkpoint(second)
        warnings = [r.getMessage() for r in caplog.records if "file descriptors" in r.getMessage()]
        assert len(warnings) == 1 and f"{first}/global_step1/mp_rank_00_model_states.pt (deleted)" in warnings[0]
        assert "notes.txt" not in warnings[0]
    finally:
        os.close(pinned)
        notes.close()
        engine.destroy()
