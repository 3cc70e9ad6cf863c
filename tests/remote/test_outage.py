"""Outages of the remote tier never fail or stall training, and never leave a remote checkpoint that looks complete
and is not: a server stopped (SIGSTOP: requests hang) or killed (SIGKILL) mid-upload, and a training process killed
mid-upload. Each test has a server of its own, as it stops or kills it.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ds_fastckpt
from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.catalog import read_catalog
from tests.ds_helpers import init_engine, single_process_env, train
from tests.remote.conftest import SeaweedServer, weed_binary
from tests.remote.replicas import remote_keys, replicate_options, store_of

WIDTH = 65536  # about 4.5 MB of model states, 9 MB of optimizer state: several parts at 5 MiB, uploads take a while


@pytest.fixture(autouse=True, scope="module")
def deepspeed_world_of_one():
    single_process_env()


@pytest.fixture
def server(tmp_path_factory, monkeypatch):
    """A SeaweedFS server of this test's own, with a fresh bucket; closed at the end whatever state it is in."""
    own = SeaweedServer(weed_binary(), tmp_path_factory.mktemp("own_seaweed"))
    own.start()
    for name, value in own.env().items():
        monkeypatch.setenv(name, value)
    own.url = f"s3://{own.make_bucket('outage')}/run"
    try:
        yield own
    finally:
        own.close()


def saver(server, **replicate):
    return init_engine(1, {"keep_last": 1, "replicate": replicate_options(
        server.url, server, request_timeout_s=2, part_size=5 << 20, concurrency=2, **replicate)}, width=WIDTH)


def complete_and_intact(store, tmp_path):
    """The remote tags that are complete, each checked file by file (size and CRC-32C of a download)."""
    catalog = read_catalog(store)
    for tag, manifest in catalog.complete.items():
        for record in manifest.files:
            target = tmp_path / "check" / tag / record.path
            target.parent.mkdir(parents=True, exist_ok=True)
            store.download_file(layout.file_key(tag, record.path), target, size=record.bytes, crc32c=record.crc32c)
    return catalog


def test_a_hung_server_stalls_no_save_and_the_newest_checkpoint_replicates_after(tmp_path, server, caplog):
    engine = saver(server)
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "ckpt")
    ds_fastckpt.wait_all()
    server.stop()  # SIGSTOP: connections open, requests hang until request_timeout_s
    with caplog.at_level(logging.WARNING, logger="ds_fastckpt"):
        for _ in range(3):  # each save returns, and training goes on, with no answer from the server
            train(engine, 2)
            engine.save_checkpoint(tmp_path / "ckpt")
    local = sorted(path.name for path in (tmp_path / "ckpt").iterdir() if path.name.startswith("global_step"))
    # keep_last 1, but the checkpoint uploading (step 3) and the one waiting (step 7) stay until they are uploaded.
    assert {"global_step3", "global_step7"} <= set(local) and "global_step1" not in local
    assert any("'global_step5' is not replicated" in record.getMessage() and "max_pending" in record.getMessage()
               for record in caplog.records)
    server.cont()
    ds_fastckpt.wait_all()
    store = store_of(server.url, server)
    catalog = complete_and_intact(store, tmp_path)
    assert sorted(catalog.complete) == ["global_step1", "global_step3", "global_step7"]
    assert catalog.latest == "global_step7"
    assert remote_keys(store, "global_step5/") == []  # skipped: what its upload left is cleaned
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "ckpt")  # the first save after they are replicated rotates them locally
    ds_fastckpt.wait_all()
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir() if path.name.startswith("global_step")) == [
        "global_step8"]
    engine.destroy()


def test_a_server_killed_mid_upload_loses_nothing_and_the_next_save_replicates(tmp_path, server):
    engine = saver(server)
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "ckpt")
    server.stop()  # the upload has begun; frozen mid-way, then the server dies
    server.kill()
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "ckpt")  # the server is down: the save and the step go on
    train(engine, 1)
    server.restart()
    ds_fastckpt.wait_all()
    store = store_of(server.url, server)
    catalog = complete_and_intact(store, tmp_path)
    assert "global_step2" in catalog.complete and catalog.latest == "global_step2"
    assert set(catalog.complete) <= {"global_step1", "global_step2"}
    engine.destroy()


SAVE_WORKER = Path(__file__).resolve().parent / "save_worker.py"


def save_in_a_child(tmp_path, server, freeze: bool = False, ready=None, **replicate):
    """``save_worker.py`` in a child process (started; waited for when ``ready`` is None)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, str(SAVE_WORKER), str(tmp_path / "ckpt"), server.url, server.endpoint_url, str(WIDTH),
               json.dumps(replicate), str(server.pid if freeze else 0)] + ([str(ready)] if ready else [])
    if ready is None:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_training_process_killed_mid_upload_leaves_no_complete_looking_tag_and_the_next_run_cleans_it(
        tmp_path, server):
    ready = tmp_path / "saved"
    child = save_in_a_child(tmp_path, server, ready=ready, part_size=5 << 20, concurrency=1)
    store = store_of(server.url, server)
    try:
        deadline = time.monotonic() + 240
        while not store.list_keys(layout.report_prefix("global_step1")):  # its upload has begun
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the upload never began"
            time.sleep(0.005)
        server.stop()  # frozen mid-upload, so that the kill lands there
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
        server.cont()
    catalog = read_catalog(store)
    assert catalog.complete == {} and catalog.uploads == ["global_step1"]
    assert ready.exists()  # the save itself had returned: the checkpoint is complete locally
    assert (tmp_path / "ckpt" / "global_step1" / MANIFEST_NAME).is_file()

    # The next run saves and replicates; its remote rotation removes what the killed upload left.
    engine = saver(server)
    engine.load_checkpoint(tmp_path / "ckpt")
    train(engine, 1)
    engine.save_checkpoint(tmp_path / "ckpt")
    ds_fastckpt.wait_all()
    assert sorted(read_catalog(store).complete) == ["global_step2"]
    assert remote_keys(store, "global_step1/") == []
    bucket = server.url.split("/")[2]
    assert server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    engine.destroy()


@pytest.mark.parametrize("server_up", [True, False])
def test_a_normal_exit_waits_for_the_upload_a_bounded_time_and_says_what_did_not_make_it(tmp_path, server,
                                                                                          server_up):
    try:
        # The child stops a server to hang once its engine exists; it ends right after save_checkpoint returns.
        result = save_in_a_child(tmp_path, server, freeze=not server_up, wait_timeout_s=3, request_timeout_s=1)
    finally:
        if not server_up:
            server.cont()
    assert result.returncode == 0, result.stderr[-3000:]
    catalog = read_catalog(store_of(server.url, server))
    if server_up:
        assert sorted(catalog.complete) == ["global_step1"] and catalog.latest == "global_step1"
        assert "not replicated" not in result.stderr
    else:  # a hung server: the exit gave up after wait_timeout_s and said so; nothing looks complete remotely
        assert catalog.complete == {}
        assert "'global_step1' not replicated to " in result.stderr, result.stderr[-3000:]
