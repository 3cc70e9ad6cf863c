"""DeepSpeed's save_checkpoint raises half-way (after some files, before the commit): that checkpoint is never
committed, not by the next save nor, in async mode, at the next step."""

import pytest
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_fastckpt.format.records import complete_checkpoints, scan
from tests.ds_helpers import init_engine, train


class Interrupted(RuntimeError):
    pass


def complete_tags(save_dir):
    return [record.tag for record in complete_checkpoints(scan(save_dir))]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_that_raised_half_way_is_never_committed(tmp_path, monkeypatch, async_save):
    engine = init_engine(1, {"keep_last": 0, "async": async_save})
    train(engine, 1)

    def fails_after_the_model_file(self, *args, **kwargs):
        raise Interrupted("optimizer state unavailable")

    with monkeypatch.context() as patch:
        patch.setattr(DeepSpeedEngine, "_save_zero_checkpoint", fails_after_the_model_file)
        with pytest.raises(Interrupted):
            engine.save_checkpoint(tmp_path)
    if async_save:
        with pytest.raises(Interrupted):  # the commit at the next step reports it instead of publishing it
            train(engine, 1)
    else:
        train(engine, 1)
    engine.save_checkpoint(tmp_path)
    engine.destroy()
    assert complete_tags(tmp_path) == [f"global_step{engine.global_steps}"]
    assert (tmp_path / "latest").read_text() == f"global_step{engine.global_steps}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [f"global_step{engine.global_steps}"]
