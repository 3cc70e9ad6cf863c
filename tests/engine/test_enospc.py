"""The disk fills up in the middle of a save: nothing is lost, nothing leaks, training goes on."""

import errno

import numpy
import pytest

from ds_fastckpt import open_fds_under
from ds_fastckpt.format.names import LOCK_NAME
from tests.ds_helpers import assert_same_state, full_state, init_engine, train

WIDTH = 1024  # about 0.4 MB per checkpoint


@pytest.mark.parametrize("async_save", [False, True])
def test_enospc_mid_save(tmp_path, mount_tmpfs, async_save):
    save_dir = mount_tmpfs("small", "size=2m")
    engine = init_engine(1, {"keep_last": 1, "async": async_save}, width=WIDTH)
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    good = full_state(engine)
    train(engine, 1)  # commits an async save
    # The guard lets it start (the last checkpoint was small); the client state does not fit.
    blob = numpy.random.default_rng(0).bytes(3 << 20)
    with pytest.raises(OSError) as raised:
        engine.save_checkpoint(save_dir, client_state={"blob": blob})
        train(engine, 1)  # the async commit
    assert raised.value.errno == errno.ENOSPC
    assert ".global_step2.ds_fastckpt-tmp" in raised.value.filename
    assert (save_dir / "latest").read_text() == "global_step1"
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == [
        "global_step1"
    ]
    assert [entry.target for entry in open_fds_under(save_dir)] == [str(save_dir / LOCK_NAME)]

    loader = init_engine(1, {"keep_last": 1}, width=WIDTH, seed=3)
    loader.load_checkpoint(save_dir)
    assert_same_state({k: v for k, v in good.items() if k.startswith("module.")},
                      {k: v for k, v in full_state(loader).items() if k.startswith("module.")})

    train(engine, 1)
    engine.save_checkpoint(save_dir)  # removes the failed save's leftovers first, then fits
    train(engine, 1)
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir()) == [  # the retired one kept as the spare
        ".global_step1.ds_fastckpt-spare", f"global_step{engine.global_steps - 1}"]
    engine.destroy()
