"""A save_dir that cannot hold checkpoints gives an OSError naming it, before any checkpoint is touched."""

import errno

import pytest

from tests.ds_helpers import init_engine, train


def test_save_dir_that_is_a_file(tmp_path):
    not_a_dir = tmp_path / "ckpts"
    not_a_dir.write_text("I am a file")
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    with pytest.raises(OSError) as raised:
        engine.save_checkpoint(not_a_dir)
    assert raised.value.errno in (errno.EEXIST, errno.ENOTDIR)
    assert str(not_a_dir) in str(raised.value)
    assert not_a_dir.read_text() == "I am a file"


def test_read_only_save_dir(mount_tmpfs):
    read_only = mount_tmpfs("ro", "ro,size=1m")
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    with pytest.raises(OSError) as raised:
        engine.save_checkpoint(read_only)
    assert raised.value.errno == errno.EROFS
    assert str(read_only) in str(raised.value)
