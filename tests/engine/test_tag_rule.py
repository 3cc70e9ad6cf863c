"""One rule for what a tag may be: every tag a save accepts is read back from `latest` as itself."""

import logging

import pytest

from ds_fastckpt import InvalidTagError
from ds_fastckpt.decisions.resume import read_latest
from ds_fastckpt.format.tags import validate_tag
from tests.ds_helpers import init_engine, single_process_env, train

# Each is refused by the saver now; before, a tab or newline was written to `latest` and then refused by its reader.
REFUSED_FOR_LATEST = ["step\t1", "step\n1", "step\r", "a\x7fb", " padded", "padded "]


@pytest.mark.parametrize("tag", REFUSED_FOR_LATEST, ids=repr)
def test_a_tag_latest_cannot_hold_is_refused_with_the_reason(tag):
    with pytest.raises(InvalidTagError) as refused:
        validate_tag(tag)
    assert "without '/', control characters (tab, newline, NUL, ...) or leading or trailing whitespace" in \
        str(refused.value)
    assert str(refused.value).endswith("as one line of UTF-8 text (DeepSpeed strips it), so it must come back "
                                       "unchanged")


@pytest.mark.parametrize("tag,why", [
    ("epoch/3", "use a single name such as 'epoch_3' instead of 'epoch/3'"),
    (".hidden", "names starting with '.' are where ds_fastckpt keeps pending, spare and trash directories"),
])
def test_tags_deepspeed_takes_and_we_refuse_say_why_and_what_instead(tag, why):
    with pytest.raises(InvalidTagError, match=why):
        validate_tag(tag)


@pytest.mark.parametrize("tag", ["global_step7", "best", "é" * 118, "with space inside", "ünïcode-✓"])
def test_every_accepted_tag_is_read_back_from_latest_as_itself(tmp_path, tag):
    (tmp_path / "latest").write_bytes(validate_tag(tag).encode())
    assert read_latest(tmp_path) == tag


def test_a_refused_tag_is_never_saved_and_rotation_keeps_what_latest_names(tmp_path, caplog):
    """Before: the save of "step\\t2" succeeded and wrote it to `latest`; the reader refused it, so rotation
    no longer protected the checkpoint `latest` named and deleted it."""
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    single_process_env()
    engine = init_engine(1, {"keep_last": 1})
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="good")
    train(engine, 1)
    with pytest.raises(InvalidTagError):
        engine.save_checkpoint(tmp_path, tag="step\t2")
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir() and not path.name.startswith(".")) \
        == ["good"]
    assert (tmp_path / "latest").read_text() == "good"
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="side", save_latest=False)
    assert (tmp_path / "good").is_dir(), "rotation deleted the checkpoint `latest` names"
    assert read_latest(tmp_path) == "good"
    engine.destroy()
