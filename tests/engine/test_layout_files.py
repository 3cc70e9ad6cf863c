"""Every file fast_aio writes holds the records torch.save would write (a synchronous save pads each CPU storage's
record so O_DIRECT writes it from its memory; an async snapshot's file is torch.save's byte for byte), and plain
DeepSpeed loads it bit-exactly."""

import io
import threading
from pathlib import Path

import pytest
import torch

import ds_fastckpt
from ds_fastckpt import FastAioCheckpointEngine
from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.native.layout_save import Layout
from ds_fastckpt.native.writer import torch_zip_crc32
from tests.ds_helpers import assert_same_state, full_state, init_engine, train
from tests.zip_records import assert_same_records


def torch_save_bytes(state) -> bytes:
    with torch_zip_crc32(False):  # the engine's default (checkpoint.fast_aio.torch_crc32)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()


def files_in(tag_dir: Path) -> dict:
    return {path.name: path.read_bytes() for path in tag_dir.iterdir() if path.name != MANIFEST_NAME}


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def load_into_plain_deepspeed(stage: int, save_dir: Path, tag: str) -> dict:
    """The state a DeepSpeed engine with its default checkpoint engine has after loading ``save_dir``."""
    loader = init_engine(stage, seed=7, engine="torch")
    assert type(loader.checkpoint_engine).__name__ == "TorchCheckpointEngine"
    load_path, _ = loader.load_checkpoint(save_dir)
    assert load_path is not None and tag in load_path
    state = full_state(loader)
    loader.destroy()
    return state


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_file_holds_torch_save_s_records_and_loads_in_plain_deepspeed(tmp_path, monkeypatch, stage):
    expected = {}
    write_file = FastAioCheckpointEngine._write_file

    def capturing_write_file(self, payload, path, save):
        assert not isinstance(payload, (bytes, Layout)), "a synchronous save writes the state it is given"
        expected[path.name] = torch_save_bytes(payload)  # the state as it is when the engine writes it
        return write_file(self, payload, path, save)

    monkeypatch.setattr(FastAioCheckpointEngine, "_write_file", capturing_write_file)
    saver = init_engine(stage, {"keep_last": 0}, seed=0)
    train(saver, 2)
    saver.save_checkpoint(tmp_path)
    saved = full_state(saver)
    saver.destroy()

    on_disk = files_in(tmp_path / "global_step2")
    assert any(name.endswith("model_states.pt") for name in on_disk)
    assert stage == 0 or any(name.endswith("optim_states.pt") for name in on_disk)
    assert sorted(on_disk) == sorted(expected)
    for name, data in on_disk.items():
        assert_same_records(data, expected[name])

    assert_same_state(saved, load_into_plain_deepspeed(stage, tmp_path, "global_step2"))


@pytest.mark.parametrize("stage", [0, 3])
def test_async_snapshot_files_do_not_show_changes_made_after_save(tmp_path, monkeypatch, stage):
    at_save, states = {}, []
    save = FastAioCheckpointEngine.save
    write_file = FastAioCheckpointEngine._write_file
    tensors_changed = threading.Event()

    def recording_save(self, state_dict, path):
        at_save[Path(path).name] = torch_save_bytes(state_dict)
        states.append(state_dict)
        return save(self, state_dict, path)

    def held_write_file(self, payload, path, save):
        # Without the snapshot this write would read the tensors after they changed.
        tensors_changed.wait(timeout=60)
        return write_file(self, payload, path, save)

    monkeypatch.setattr(FastAioCheckpointEngine, "save", recording_save)
    monkeypatch.setattr(FastAioCheckpointEngine, "_write_file", held_write_file)
    engine = init_engine(stage, {"keep_last": 0, "async": True, "snapshot": True}, seed=0)
    train(engine, 2)
    engine.save_checkpoint(tmp_path)
    saved = full_state(engine)
    with torch.no_grad():
        for state in states:
            for tensor in tensors_in(state):
                if tensor.is_floating_point():
                    tensor.add_(1.0)
    # Each state holding data did change in place (ZeRO-3's model file holds only empty partitioned parameters).
    holds_data = [any(tensor.numel() for tensor in tensors_in(state)) for state in states]
    changed = [torch_save_bytes(state) != before for state, before in zip(states, at_save.values())]
    assert any(changed) and changed == holds_data
    assert not (tmp_path / "global_step2" / MANIFEST_NAME).exists()  # not committed yet
    tensors_changed.set()
    ds_fastckpt.wait(engine)
    engine.destroy()

    on_disk = files_in(tmp_path / "global_step2")
    assert sorted(on_disk) == sorted(at_save)
    for name, data in on_disk.items():
        assert data == at_save[name], name
    assert_same_state(saved, load_into_plain_deepspeed(stage, tmp_path, "global_step2"))
