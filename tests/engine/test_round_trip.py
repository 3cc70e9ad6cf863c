"""Save then load gives back exactly the state that was saved, for every ZeRO stage."""

import json

import pytest
import torch

from ds_fastckpt import FastAioCheckpointEngine
from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.native.op import load_op
from tests.ds_helpers import assert_same_state, deepspeed_scripts, full_state, init_engine, train


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_round_trip_is_bit_exact(tmp_path, stage):
    saver = init_engine(stage, {"keep_last": 2}, seed=0)
    assert isinstance(saver.checkpoint_engine, FastAioCheckpointEngine)
    train(saver, 3)
    saver.save_checkpoint(tmp_path)
    saved = full_state(saver)

    loader = init_engine(stage, {"keep_last": 2, "verify": "checksum"}, seed=7)
    before = full_state(loader)
    assert any(not torch.equal(saved[key], before[key]) for key in saved if key.startswith("module."))
    load_path, client_state = loader.load_checkpoint(tmp_path)
    assert load_path is not None and "global_step3" in load_path
    assert_same_state(saved, full_state(loader))


def test_manifest_records_every_file_with_size_and_crc32c(tmp_path):
    engine = init_engine(2, {"keep_last": 0}, seed=0)
    train(engine, 2)
    engine.save_checkpoint(tmp_path, client_state={"epoch": 4})
    tag_dir = tmp_path / "global_step2"
    manifest = json.loads((tag_dir / MANIFEST_NAME).read_text())
    on_disk = sorted(p.name for p in tag_dir.iterdir() if p.name != MANIFEST_NAME)
    assert [record["path"] for record in manifest["files"]] == on_disk
    for record in manifest["files"]:
        data = (tag_dir / record["path"]).read_bytes()
        assert record["bytes"] == len(data)
        assert record["crc32c"] == load_op().crc32c(data)
    assert manifest["step"] == 2 and manifest["world_size"] == 1 and manifest["tag"] == "global_step2"
    assert manifest["deepspeed_version"] and manifest["ds_fastckpt_version"]
    assert (tmp_path / "latest").read_text() == "global_step2"
    loaded = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    assert loaded["epoch"] == 4


def test_without_fast_aio_deepspeed_is_unchanged(tmp_path):
    engine = init_engine(1, engine=None)
    assert type(engine.checkpoint_engine).__name__ == "TorchCheckpointEngine"
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    assert not (tmp_path / "global_step1" / MANIFEST_NAME).exists()
    assert (tmp_path / "global_step1" / "mp_rank_00_model_states.pt").is_file()


def test_saving_the_same_tag_again_replaces_it_completely(tmp_path):
    engine = init_engine(1, {"keep_last": 3}, seed=0)
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="best")
    train(engine, 2)
    engine.save_checkpoint(tmp_path, tag="best")
    saved = full_state(engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds_fastckpt.lock", "best", "latest", *deepspeed_scripts()]
    loader = init_engine(1, {"keep_last": 3}, seed=3)
    loader.load_checkpoint(tmp_path)
    assert_same_state(saved, full_state(loader))
