"""Tags are limited in bytes of the filesystem encoding, so every name derived from one fits NAME_MAX."""

import errno
import os
import sys

import pytest

from ds_fastckpt import InvalidTagError
from ds_fastckpt.format.names import pending_path, trash_path
from ds_fastckpt.format.tags import MAX_TAG_BYTES, validate_tag
from tests.ds_helpers import init_engine, single_process_env, train

pytestmark = pytest.mark.skipif(sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"),
                                reason="the byte counts below are UTF-8's")

TWO_BYTES = "é"  # U+00E9: two bytes in UTF-8


def derived_dirs(save_dir, tag):
    """Every directory a save and a rotation of ``tag`` create, in the order they create them."""
    return [pending_path(save_dir, tag), save_dir / tag, trash_path(save_dir, tag)]


def test_the_limit_is_236_bytes():
    # NAME_MAX 255 minus the longest affixes, "." and ".ds_fastckpt-trash"; the README states this number.
    assert MAX_TAG_BYTES == 236


def test_200_two_byte_characters_are_refused():
    tag = TWO_BYTES * 200  # 200 characters, 400 bytes: counted in characters this passed and failed at mkdir
    with pytest.raises(InvalidTagError, match="is not allowed: a tag is one directory name of 1 to 236 bytes of "
                                              "UTF-8 text.*; this one is 400 bytes"):
        validate_tag(tag)


@pytest.mark.parametrize("longest", [
    "a" * 236,
    TWO_BYTES * 118,
    "a" + TWO_BYTES * 117 + "b",
    "\U0001F600" * 59,  # four bytes each
], ids=["ascii", "two-byte", "mixed", "four-byte"])
def test_the_longest_tag_creates_every_derived_name_and_one_byte_more_is_refused(tmp_path, longest):
    assert len(os.fsencode(longest)) == MAX_TAG_BYTES
    assert validate_tag(longest) == longest
    for directory in derived_dirs(tmp_path, longest):  # real mkdir and rename on the real filesystem
        directory.mkdir()
        assert os.fsencode(directory.name) in os.listdir(os.fsencode(tmp_path))
    final = tmp_path / longest
    final.rmdir()
    pending_path(tmp_path, longest).rename(final)  # the commit's rename
    trash_path(tmp_path, longest).rmdir()
    final.rename(trash_path(tmp_path, longest))  # rotation's rename before deletion

    one_more = longest + "c"
    with pytest.raises(InvalidTagError, match=f"; this one is {MAX_TAG_BYTES + 1} bytes$"):
        validate_tag(one_more)
    with pytest.raises(OSError) as too_long:  # what validate_tag spares the caller
        trash_path(tmp_path, one_more).mkdir()
    assert too_long.value.errno == errno.ENAMETOOLONG


@pytest.mark.parametrize("tag", [
    "step\ud800",  # a lone surrogate that no byte stands for
    os.fsdecode(b"\xff" * 8),  # a name that is not UTF-8: `latest` could not hold it as text
], ids=["lone-surrogate", "surrogateescape"])
def test_a_tag_utf_8_cannot_hold_is_refused(tag):
    with pytest.raises(InvalidTagError, match="this one cannot be encoded in UTF-8; the tag is written to and read "
                                              "back from 'latest'"):
        validate_tag(tag)


def test_the_engine_saves_and_loads_the_longest_tag(tmp_path):
    single_process_env()
    tag = TWO_BYTES * 118
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag=tag)
    assert (tmp_path / tag).is_dir() and (tmp_path / "latest").read_text() == tag
    load_path, _ = engine.load_checkpoint(tmp_path, tag=tag)
    assert load_path is not None
    with pytest.raises(InvalidTagError, match="this one is 238 bytes"):
        engine.save_checkpoint(tmp_path, tag=TWO_BYTES * 119)
    assert [name for name in os.listdir(tmp_path) if TWO_BYTES in name] == [tag]  # nothing of the refused tag
    engine.destroy()
