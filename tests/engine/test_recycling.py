"""recycle_retired: a save writes over the files of the checkpoint rotation retired before, never over anyone's."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

import ds_fastckpt
from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.native.op import load_op
from tests.ds_helpers import assert_same_state, full_state, init_engine, train

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def inodes(directory):
    return {name: os.stat(directory / name).st_ino for name in (MODEL_FILE, OPTIM_FILE)}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(engine, save_dir, async_save=False):
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    if async_save:
        ds_fastckpt.wait(engine)


def dot_dirs(save_dir):
    """Our hidden directories, but the trash of a removal that may still run on the async writer thread."""
    return sorted(entry.name for entry in save_dir.iterdir()
                  if entry.is_dir() and entry.name.startswith(".") and not entry.name.endswith("-trash"))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_each_save_writes_over_the_files_of_the_checkpoint_retired_before(tmp_path, async_save):
    engine = init_engine(1, {"keep_last": 1, "async": async_save})
    save(engine, tmp_path, async_save)
    first = inodes(tmp_path / "global_step1")
    save(engine, tmp_path, async_save)
    assert dot_dirs(tmp_path) == [".global_step1.ds_fastckpt-spare"]
    save(engine, tmp_path, async_save)
    expected = full_state(engine)
    assert inodes(tmp_path / "global_step3") == first  # the same files, written over in place
    assert dot_dirs(tmp_path) == [".global_step2.ds_fastckpt-spare"]  # global_step1's spare is gone
    manifest = json.loads((tmp_path / "global_step3" / MANIFEST_NAME).read_text())
    for record in manifest["files"]:
        data = (tmp_path / "global_step3" / record["path"]).read_bytes()
        assert (len(data), load_op().crc32c(data)) == (record["bytes"], record["crc32c"])
    engine.destroy()  # waits for removals still running
    assert sorted(entry.name for entry in tmp_path.iterdir() if entry.is_dir()) == [
        ".global_step2.ds_fastckpt-spare", "global_step3"]

    resumed = init_engine(1, {"keep_last": 1}, seed=7)
    resumed.load_checkpoint(tmp_path)
    assert_same_state(expected, full_state(resumed))


def test_a_hard_link_to_a_retired_file_keeps_its_bytes(tmp_path):
    save_dir = tmp_path / "ckpts"
    engine = init_engine(1, {"keep_last": 1})
    save(engine, save_dir)
    kept = tmp_path / "best_optim_states.pt"
    os.link(save_dir / "global_step1" / OPTIM_FILE, kept)  # "keep this one", as users do with ln
    digest, first = sha256(kept), inodes(save_dir / "global_step1")
    save(engine, save_dir)
    save(engine, save_dir)
    assert sha256(kept) == digest
    now = inodes(save_dir / "global_step3")
    assert now[OPTIM_FILE] != first[OPTIM_FILE] and now[MODEL_FILE] == first[MODEL_FILE]
    assert os.stat(kept).st_nlink == 1  # the rotation after global_step3 removed the spare's other name


def test_a_reader_in_another_process_keeps_reading_the_bytes_it_opened(tmp_path):
    engine = init_engine(1, {"keep_last": 1})
    save(engine, tmp_path)
    path = tmp_path / "global_step1" / MODEL_FILE
    digest = sha256(path)
    reader = subprocess.Popen(  # an evaluation job that opened global_step1 and reads it slowly
        [sys.executable, "-c", f"import hashlib, sys; f = open({str(path)!r}, 'rb'); print('open', flush=True); "
         "sys.stdin.readline(); print(hashlib.sha256(f.read()).hexdigest(), flush=True)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "open\n"
        first = inodes(tmp_path / "global_step1")
        save(engine, tmp_path)
        save(engine, tmp_path)
        now = inodes(tmp_path / "global_step3")
        assert now[MODEL_FILE] != first[MODEL_FILE] and now[OPTIM_FILE] == first[OPTIM_FILE]
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == digest
    finally:
        reader.stdin.close()
        reader.wait()


def test_recycle_retired_off_frees_every_rotated_checkpoint(tmp_path):
    engine = init_engine(1, {"keep_last": 1, "recycle_retired": False})
    for _ in range(3):
        save(engine, tmp_path)
        assert dot_dirs(tmp_path) == []
    assert sorted(entry.name for entry in tmp_path.iterdir() if entry.is_dir()) == ["global_step3"]
