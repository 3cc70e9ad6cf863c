"""The remote tier through the real engine, in one process: replication, its layout, rotation, resume from it.

Every test runs against the real SeaweedFS server (``s3``) and a second local directory standing in for a shared
filesystem (``fs``), through ``remote_url``.
"""

import json
import logging
import shutil

import pytest
import torch

import ds_fastckpt
from ds_fastckpt import ConfigError
from ds_fastckpt.format.names import LATEST_NAME, MANIFEST_NAME, REMOTE_NOTE_NAME
from ds_fastckpt.native.op import load_op
from ds_fastckpt.remote.catalog import read_catalog
from ds_fastckpt.remote.store import RemoteIntegrityError
from tests.ds_helpers import assert_same_state, full_state, init_engine, single_process_env, train
from tests.remote.replicas import remote_bytes, remote_keys, replicate_options, store_of


@pytest.fixture(autouse=True, scope="module")
def deepspeed_world_of_one():
    single_process_env()


@pytest.fixture(autouse=True)
def check_fd_leaks(no_fd_leaks):
    """Each test ends with no descriptor into its tmp dir (uploads read the checkpoint files)."""


def saver(url, seaweed, keep_last=1, stage=1, seed=0, **replicate):
    return init_engine(stage, {"keep_last": keep_last, "replicate": replicate_options(url, seaweed, **replicate)},
                       seed=seed)


def test_each_checkpoint_lands_remotely_in_the_local_layout_manifest_last(tmp_path, remote_url, seaweed):
    engine = saver(remote_url, seaweed, keep_last=1, keep_last_remote=2)
    for _ in range(3):
        train(engine, 1)
        engine.save_checkpoint(tmp_path / "ckpt")
        ds_fastckpt.wait_all()  # else a checkpoint saved while two wait would be skipped (max_pending 1)
    saved = full_state(engine)
    store = store_of(remote_url, seaweed)
    # keep_last 1 locally, 2 remotely: each tier rotates by its own policy.
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir() if path.is_dir() and
                  not path.name.startswith(".")) == ["global_step3"]
    catalog = read_catalog(store)
    assert sorted(catalog.complete) == ["global_step2", "global_step3"]
    assert catalog.latest == "global_step3" and remote_bytes(store, LATEST_NAME) == b"global_step3"
    local = json.loads((tmp_path / "ckpt" / "global_step3" / MANIFEST_NAME).read_text())
    remote = json.loads(remote_bytes(store, f"global_step3/{MANIFEST_NAME}"))
    assert remote["files"] == local["files"] and remote["sequence"] == local["sequence"]
    for record in local["files"]:
        data = remote_bytes(store, f"global_step3/{record['path']}")
        assert data == (tmp_path / "ckpt" / "global_step3" / record["path"]).read_bytes()
        assert load_op().crc32c(data) == record["crc32c"]
    # Nothing but the layout: no upload reports left once committed.
    assert sorted(remote_keys(store, "global_step3/")) == sorted(
        [f"global_step3/{record['path']}" for record in local["files"]] + [f"global_step3/{MANIFEST_NAME}"])
    note = json.loads((tmp_path / "ckpt" / REMOTE_NOTE_NAME).read_text())
    assert note["url"] == remote_url and "secret" not in json.dumps(note).lower()
    engine.destroy()

    # The node is gone: a new save_dir resumes from the remote tier, bit-exactly, and commits it locally.
    shutil.rmtree(tmp_path / "ckpt")
    loader = saver(remote_url, seaweed, seed=7)
    path, _ = loader.load_checkpoint(tmp_path / "ckpt")
    assert path is not None and "global_step3" in path
    assert_same_state(saved, full_state(loader))
    assert (tmp_path / "ckpt" / LATEST_NAME).read_text() == "global_step3"
    assert json.loads((tmp_path / "ckpt" / "global_step3" / MANIFEST_NAME).read_text())["files"] == local["files"]
    loader.destroy()


def test_the_newest_of_either_tier_resumes(tmp_path, remote_url, seaweed):
    engine = saver(remote_url, seaweed, keep_last=3)
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "a")
    ds_fastckpt.wait_all()
    engine.destroy()
    # A local save_dir that holds an older checkpoint than the remote tier: the remote one wins.
    other = saver(remote_url, seaweed, keep_last=3)
    train(other, 2)
    other.save_checkpoint(tmp_path / "b")
    newer = full_state(other)
    ds_fastckpt.wait_all()
    other.destroy()
    loader = saver(remote_url, seaweed, keep_last=3, seed=5)
    path, _ = loader.load_checkpoint(tmp_path / "a")
    assert "global_step2" in path
    assert_same_state(newer, full_state(loader))
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("global")) == [
        "global_step1", "global_step2"]
    # And the local one wins when it is the newest.
    train(loader, 1)
    loader.save_checkpoint(tmp_path / "a", tag="local_only")  # newest, never uploaded: the server copy is older
    local_state = full_state(loader)
    loader.destroy()
    resumed = saver(remote_url, seaweed, keep_last=3, seed=9)
    path, _ = resumed.load_checkpoint(tmp_path / "a")
    assert path.endswith("local_only/mp_rank_00_model_states.pt")
    assert_same_state(local_state, full_state(resumed))
    resumed.destroy()


def replicated_once(save_dir, remote_url, seaweed):
    """Saves global_step1 into ``save_dir``, replicated; returns the store."""
    engine = saver(remote_url, seaweed)
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    ds_fastckpt.wait_all()
    engine.destroy()
    return store_of(remote_url, seaweed)


def test_a_damaged_remote_file_is_refused_and_nothing_is_committed_locally(tmp_path, remote_url, seaweed):
    store = replicated_once(tmp_path / "ckpt", remote_url, seaweed)
    key = "global_step1/mp_rank_00_model_states.pt"
    data = bytearray(remote_bytes(store, key))
    data[len(data) // 2] ^= 0xFF  # same size, one flipped bit
    store.put_bytes(key, bytes(data))
    shutil.rmtree(tmp_path / "ckpt")
    loader = saver(remote_url, seaweed, seed=3)
    with pytest.raises(RemoteIntegrityError, match="mp_rank_00_model_states.pt"):
        loader.load_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "global_step1").exists()
    assert not (tmp_path / "ckpt" / LATEST_NAME).exists()
    loader.destroy()


def test_a_hostile_remote_manifest_is_not_resumed_from(tmp_path, remote_url, seaweed):
    store = replicated_once(tmp_path / "ckpt", remote_url, seaweed)
    manifest = json.loads(remote_bytes(store, f"global_step1/{MANIFEST_NAME}"))
    manifest["files"][0]["path"] = "../../escape.pt"
    store.put_bytes(f"global_step1/{MANIFEST_NAME}", json.dumps(manifest).encode())
    shutil.rmtree(tmp_path / "ckpt")
    loader = saver(remote_url, seaweed, seed=3)
    assert loader.load_checkpoint(tmp_path / "ckpt") == (None, None)
    assert not (tmp_path / "escape.pt").exists() and not (tmp_path / "ckpt" / "global_step1").exists()
    assert "global_step1" in read_catalog(store).damaged
    loader.destroy()


def test_remote_rotation_deletes_only_what_is_ours(tmp_path, remote_url, seaweed):
    store = store_of(remote_url, seaweed)
    store.put_bytes("notours/weights.bin", b"a user's file")
    store.put_bytes("global_step1/extra.txt", b"a user's file inside a tag we will rotate")
    engine = saver(remote_url, seaweed, keep_last_remote=1)
    for _ in range(3):
        train(engine, 1)
        engine.save_checkpoint(tmp_path / "ckpt")
        ds_fastckpt.wait_all()
    engine.destroy()
    assert sorted(read_catalog(store).complete) == ["global_step3"]
    assert remote_bytes(store, "notours/weights.bin") == b"a user's file"
    assert remote_keys(store, "global_step1/") == ["global_step1/extra.txt"]
    assert remote_keys(store, "global_step2/") == []


def test_config_errors_name_the_key_and_what_is_allowed(tmp_path, seaweed):
    cases = [({"url": "relative/path"}, "replicate.url='relative/path'"),
             ({"endpoint_url": "http://x"}, "needs \"url\""),
             ({"url": "s3://bucket/p", "max_pending": 0}, "replicate.max_pending=0 is not allowed"),
             ({"url": "s3://bucket/p", "part_size": 1024}, "replicate.part_size=1024 is not allowed"),
             ({"url": "s3://bucket/p", "bucket": "x"}, "unknown key(s) 'bucket'")]
    for section, message in cases:
        with pytest.raises(ConfigError, match=None) as raised:
            init_engine(1, {"replicate": section})
        assert message in str(raised.value), (section, str(raised.value))


def test_an_unreachable_store_fails_initialize_naming_url_and_endpoint_never_the_secret(tmp_path, seaweed,
                                                                                      monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ds-fastckpt-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-42")
    with pytest.raises(ConfigError) as raised:
        init_engine(1, {"replicate": {"url": "s3://nobucket/run", "endpoint_url": "http://127.0.0.1:9",
                                      "request_timeout_s": 2}})
    assert "s3://nobucket/run" in str(raised.value) and "127.0.0.1:9" in str(raised.value)
    assert "very-secret-value-42" not in str(raised.value)
    with pytest.raises(ConfigError, match="nobucket"):
        init_engine(1, {"replicate": replicate_options("s3://nobucket-at-all/run", seaweed)})
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    bucket = seaweed.make_bucket("credentials-refused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-42")  # the right key id, a wrong secret
    with pytest.raises(ConfigError) as raised:
        init_engine(1, {"replicate": replicate_options(f"s3://{bucket}/run", seaweed)})
    assert f"s3://{bucket}/run" in str(raised.value) and seaweed.endpoint_url in str(raised.value)
    assert "very-secret-value-42" not in str(raised.value) and seaweed.secret_key not in str(raised.value)


def test_wait_all_waits_for_replication_and_a_later_save_never_blocks_on_it(tmp_path, remote_url, seaweed, caplog):
    engine = saver(remote_url, seaweed)
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="ds_fastckpt"):
        ds_fastckpt.wait_all()
    assert "global_step1" in read_catalog(store_of(remote_url, seaweed)).complete
    assert any("is replicated to" in record.getMessage() for record in caplog.records)
    engine.destroy()
    assert torch.load(tmp_path / "ckpt" / "global_step1" / "mp_rank_00_model_states.pt", weights_only=False)
