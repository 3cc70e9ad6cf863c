"""A damaged newest checkpoint: resume raises an error naming the file and the damage, or, with
``skip_damaged_on_resume``, resumes bit-exact from the newest intact checkpoint with a warning.

Never a bare AssertionError or torch's "not a ZIP archive": every case raises CheckpointIntegrityError.
"""

import io
import logging
import re
import zipfile

import pytest

from ds_fastckpt import CheckpointIntegrityError
from ds_fastckpt.format.names import MANIFEST_NAME
from tests.ds_helpers import assert_same_state, full_state, init_engine, save_twice

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def truncate(tag_dir):
    victim = tag_dir / MODEL
    victim.write_bytes(victim.read_bytes()[:-10])
    return victim, "has .* bytes; the manifest says"


def zero_fill(tag_dir):
    victim = tag_dir / OPTIM
    victim.write_bytes(bytes(victim.stat().st_size))
    return victim, "is not a complete torch.save archive"


def flip_a_bit(tag_dir):
    victim = tag_dir / OPTIM
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    return victim, "has CRC-32C"


def remove(tag_dir):
    victim = tag_dir / MODEL
    victim.unlink()
    return victim, "is missing"


def garbage_manifest(tag_dir):
    victim = tag_dir / MANIFEST_NAME
    victim.write_bytes(b"\x00garbage{")
    return victim, "is damaged and cannot be read"


def zero_the_pickle(tag_dir):
    """Zeroes the model file's pickle inside an intact archive: same size, same ends, only a CRC or torch can tell."""
    victim = tag_dir / MODEL
    data = bytearray(victim.read_bytes())
    info = next(i for i in zipfile.ZipFile(io.BytesIO(bytes(data))).infolist() if i.filename.endswith("data.pkl"))
    offset = info.header_offset
    start = offset + 30 + int.from_bytes(data[offset + 26:offset + 28], "little") + \
        int.from_bytes(data[offset + 28:offset + 30], "little")
    data[start + 2:start + info.compress_size - 1] = bytes(info.compress_size - 3)
    victim.write_bytes(bytes(data))
    return victim, None


# (damage, verify) -> the message with skip_damaged_on_resume off; a flipped bit in tensor data is only seen by
# a checksum, and a zeroed pickle only by the checksum or by torch.load.
CASES = [(truncate, "size"), (truncate, "checksum"), (zero_fill, "size"), (zero_fill, "checksum"),
         (flip_a_bit, "checksum"), (remove, "size"), (remove, "checksum"), (garbage_manifest, "size"),
         (garbage_manifest, "checksum"), (zero_the_pickle, "size"), (zero_the_pickle, "checksum")]
IDS = [f"{damage.__name__}-{verify}" for damage, verify in CASES]


@pytest.fixture
def two_checkpoints(tmp_path):
    return tmp_path, save_twice(init_engine(1, {"keep_last": 0}), tmp_path)


def resume(save_dir, **fast_aio):
    engine = init_engine(1, {"keep_last": 0, **fast_aio}, seed=9)
    path, _ = engine.load_checkpoint(save_dir)
    return engine, path


@pytest.mark.parametrize("damage, verify", CASES, ids=IDS)
def test_resume_names_the_damaged_file(two_checkpoints, damage, verify):
    save_dir, _ = two_checkpoints
    victim, message = damage(save_dir / "global_step2")
    with pytest.raises(CheckpointIntegrityError) as raised:
        resume(save_dir, verify=verify)
    text = str(raised.value)
    assert str(victim) in text
    if message is None:  # with verify "size" torch.load fails first; the CRC-32C then tells it is damage
        message = "has CRC-32C"
    assert re.search(message, text), text
    assert "not a ZIP archive" not in text and "skip_damaged_on_resume=true" in text


@pytest.mark.parametrize("damage, verify", CASES, ids=IDS)
def test_skip_damaged_on_resume_goes_back_to_the_newest_intact(two_checkpoints, caplog, damage, verify):
    save_dir, older = two_checkpoints
    victim, _ = damage(save_dir / "global_step2")
    caplog.set_level(logging.WARNING, logger="ds_fastckpt")
    if damage is zero_the_pickle and verify == "size":
        # Size and archive ends are intact: only torch.load finds it, once the load has begun; too late to skip.
        with pytest.raises(CheckpointIntegrityError, match="has CRC-32C"):
            resume(save_dir, verify=verify, skip_damaged_on_resume=True)
        return
    engine, path = resume(save_dir, verify=verify, skip_damaged_on_resume=True)
    assert "global_step1" in path
    assert_same_state(older, full_state(engine))
    warnings = [record.getMessage() for record in caplog.records if record.name.startswith("ds_fastckpt")]
    assert any("skipping a damaged checkpoint" in w and str(victim) in w for w in warnings), warnings


def test_skip_damaged_on_resume_with_every_checkpoint_damaged_raises(two_checkpoints):
    save_dir, _ = two_checkpoints
    truncate(save_dir / "global_step2")
    remove(save_dir / "global_step1")
    with pytest.raises(CheckpointIntegrityError, match="every checkpoint in .* is damaged"):
        resume(save_dir, skip_damaged_on_resume=True)


def test_an_explicit_tag_is_never_skipped(two_checkpoints):
    save_dir, _ = two_checkpoints
    victim, _ = truncate(save_dir / "global_step2")
    engine = init_engine(1, {"keep_last": 0, "skip_damaged_on_resume": True}, seed=9)
    with pytest.raises(CheckpointIntegrityError, match="has .* bytes") as raised:
        engine.load_checkpoint(save_dir, tag="global_step2")
    assert str(victim) in str(raised.value)
