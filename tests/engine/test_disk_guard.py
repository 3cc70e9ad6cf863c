"""A save that will not fit fails before writing a byte, after rotating early when keep_last allows."""

import errno

import pytest

from ds_fastckpt import InsufficientSpaceError, InvalidTagError
from tests.ds_helpers import init_engine, train

WIDTH = 4096  # about 1.4 MB per checkpoint with AdamW state


def checkpoint_bytes(tmp_path) -> int:
    engine = init_engine(1, {"keep_last": 0}, width=WIDTH)
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "probe")
    return sum(p.stat().st_size for p in (tmp_path / "probe").rglob("*") if p.is_file())


def test_no_room_fails_before_writing(tmp_path, mount_tmpfs):
    size = checkpoint_bytes(tmp_path)
    save_dir = mount_tmpfs("small", f"size={int(size * 1.5)}")
    engine = init_engine(1, {"keep_last": 1}, width=WIDTH)
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    before = sorted(p.name for p in save_dir.iterdir())
    train(engine, 1)
    with pytest.raises(InsufficientSpaceError) as raised:
        engine.save_checkpoint(save_dir)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(save_dir)
    assert "bytes and only" in str(raised.value) and "nothing was written" in str(raised.value)
    assert sorted(p.name for p in save_dir.iterdir()) == before
    assert (save_dir / "latest").read_text() == "global_step1"


def test_rotates_early_when_keep_last_allows(tmp_path, mount_tmpfs):
    size = checkpoint_bytes(tmp_path)
    save_dir = mount_tmpfs("small", f"size={int(size * 2.6)}")
    engine = init_engine(1, {"keep_last": 2}, width=WIDTH)
    for _ in range(4):
        train(engine, 1)
        engine.save_checkpoint(save_dir)
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir()) == ["global_step3", "global_step4"]


@pytest.mark.parametrize("tag", ["", ".", "..", "../x", "/abs", "a/b", "a\0b", "x" * 300, "latest",
                                 ".hidden", ".t.ds_fastckpt-tmp"])
def test_unsafe_tags_are_refused_before_any_filesystem_call(tmp_path, tag):
    engine = init_engine(1, {"keep_last": 1})
    save_dir = tmp_path / "never_created"
    with pytest.raises(InvalidTagError, match="is not allowed: a tag is one directory name"):
        engine.save_checkpoint(save_dir, tag=tag)
    assert not save_dir.exists()
