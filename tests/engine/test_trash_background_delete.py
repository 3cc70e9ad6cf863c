"""background_delete with tags that come back: one owner per trash directory, nothing left after destroy.

A tag retired again while the remover thread is still unlinking its last trash directory (tags alternating
"last"/"best", or one tag saved again) must wait for that removal, never remove the same tree inline beside it.
The remover here is slow, as unlinking is on a filesystem mounted with ``discard``.
"""

import logging
import time

import pytest

from ds_fastckpt.decisions import rotation
from ds_fastckpt.format.names import TRASH_SUFFIX
from tests.ds_helpers import assert_same_state, full_state, init_engine, train

TAGS = ["last", "best", "last", "best", "best", "last", "last", "best", "last"]


@pytest.fixture
def slow_remover(monkeypatch):
    remove = rotation.remove_retired

    def slow_remove(trash):
        time.sleep(0.3)
        remove(trash)

    monkeypatch.setattr(rotation, "remove_retired", slow_remove)


@pytest.mark.parametrize("recycle", [True, False], ids=["recycle", "no_recycle"])
def test_repeating_tags_with_slow_background_removal_leave_no_trash(tmp_path, slow_remover, caplog, recycle):
    engine = init_engine(1, {"keep_last": 1, "recycle_retired": recycle, "background_delete": True})
    with caplog.at_level(logging.WARNING, logger="ds_fastckpt"):
        for tag in TAGS:
            train(engine, 1)
            engine.save_checkpoint(tmp_path, tag=tag)  # raises nothing
        expected = full_state(engine)
        engine.destroy()
    problems = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert problems == []
    assert [entry.name for entry in tmp_path.iterdir() if entry.name.endswith(TRASH_SUFFIX)] == []
    assert sorted(entry.name for entry in tmp_path.iterdir() if entry.is_dir() and not entry.name.startswith(".")) \
        == [TAGS[-1]]
    resumed = init_engine(1, {"keep_last": 1}, seed=5)
    path, _ = resumed.load_checkpoint(tmp_path)
    assert f"/{TAGS[-1]}/" in path
    assert_same_state(expected, full_state(resumed))
    resumed.destroy()
