"""``ds-fastckpt ls|verify|prune`` of the remote tier (``s3://`` on the real SeaweedFS server), and ``ls SAVE_DIR``
showing which checkpoints it holds.

The remote checkpoints are real ones: saved by the engine into a local save_dir, then put into the remote layout
through the store API (files, then the manifest, then ``latest``), as the replicator does.
"""

import dataclasses
import json
import shutil
import time

import pytest

from ds_fastckpt.cli.main import main
from ds_fastckpt.format.manifest import read_manifest
from ds_fastckpt.format.names import MANIFEST_NAME, REMOTE_NOTE_NAME
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.s3_store import S3Store
from tests.ds_helpers import init_engine, single_process_env, train
from tests.remote.replicas import remote_bytes, remote_keys, store_of

MODEL_STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save_dir with global_step1, 2 and 3, all kept; latest names global_step3."""
    single_process_env()
    save_dir = tmp_path_factory.mktemp("cli_remote") / "ckpts"
    engine = init_engine(1, {"keep_last": 0})
    for _ in range(3):
        train(engine, 1)
        engine.save_checkpoint(save_dir)
    engine.destroy()
    return save_dir


def upload(store, save_dir, tag, as_tag=None, set_latest=True) -> None:
    """Replicates ``save_dir/tag`` (as ``as_tag``) in the remote layout: its files, its manifest, then ``latest``."""
    as_tag = as_tag or tag
    manifest = read_manifest(save_dir / tag)
    for record in manifest.files:
        store.upload_file(save_dir / tag / record.path, layout.file_key(as_tag, record.path), size=record.bytes,
                          crc32c=record.crc32c)
    store.put_bytes(layout.manifest_key(as_tag), dataclasses.replace(manifest, tag=as_tag).to_json())
    if set_latest:
        store.put_bytes(layout.latest_key(), as_tag.encode())


@pytest.fixture
def tier(saved, s3_url, seaweed):
    """``s3_url`` holding global_step1, 2 and 3 of ``saved``; latest names global_step3."""
    store = store_of(s3_url, seaweed)
    for tag in ("global_step1", "global_step2", "global_step3"):
        upload(store, saved, tag)
    yield store
    store.close()


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def unfinished_upload(store, tag) -> None:
    """What an upload interrupted (or still running) leaves: rank 0's report and one of the files it names."""
    store.put_bytes(layout.report_key(tag, 0), layout.UploadReport(layout.UPLOADING, (MODEL_STATES,)).to_json())
    store.put_bytes(layout.file_key(tag, MODEL_STATES), b"half a file")


def test_ls_lists_complete_damaged_and_unfinished_checkpoints(saved, tier, s3_url, capsys):
    tier.put_bytes(layout.manifest_key("global_step4"), b"not json")
    unfinished_upload(tier, "global_step5")
    code, out, _ = run(capsys, "ls", s3_url, "--keep-last", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TAG", "STEP", "STATE"]
    assert [line.split()[:3] for line in lines[1:6]] == [
        ["global_step1", "1", "complete"], ["global_step2", "2", "complete"], ["global_step3", "3", "complete"],
        ["global_step4", "-", "damaged"], ["global_step5", "-", "unfinished"]]
    assert lines[1].endswith("next to rotate") and lines[3].endswith("latest, resume")
    assert not lines[2].endswith("rotate") and not lines[5].endswith("rotate")  # a fresh upload may be running
    assert lines[6] == "resume: 'latest' names 'global_step3', a complete checkpoint"

    code, out, _ = run(capsys, "ls", s3_url, "--json", "--keep-last", "2")
    rows = json.loads(out)
    _, local_out, _ = run(capsys, "ls", saved, "--json")
    assert code == 0 and all(row.keys() == json.loads(local_out)[0].keys() for row in rows)
    by_tag = {row["tag"]: row for row in rows}
    local = read_manifest(saved / "global_step2")
    assert by_tag["global_step2"] == {**by_tag["global_step2"], "step": 2, "complete": True, "state": "complete",
                                      "bytes": local.total_bytes, "files": len(local.files), "latest": False,
                                      "resume": False, "next_to_delete": False}
    assert [by_tag[f"global_step{step}"]["next_to_delete"] for step in (1, 3)] == [True, False]
    assert (by_tag["global_step4"]["complete"], by_tag["global_step5"]["complete"]) == (False, False)
    assert by_tag["global_step5"]["files"] == 2 and 0 <= by_tag["global_step5"]["age_s"] < 600


def test_verify_downloads_and_checks_every_file(tier, s3_url, capsys):
    code, out, _ = run(capsys, "verify", s3_url)
    assert code == 0 and out.splitlines()[-1].startswith("all ") and f"3 checkpoint(s) in {s3_url} are intact" in out
    key = layout.file_key("global_step2", MODEL_STATES)
    data = bytearray(remote_bytes(tier, key))
    data[len(data) // 2] ^= 0x01  # same size, other bytes
    tier.put_bytes(key, bytes(data))
    code, out, _ = run(capsys, "verify", s3_url)
    assert code == 1
    [line] = [line for line in out.splitlines() if f"{s3_url}/{key}" in line]
    assert "CRC-32C" in line and "/tmp" not in line
    assert out.splitlines()[-1] == f"1 problem(s) found in {s3_url}"
    code, out, _ = run(capsys, "verify", s3_url, "global_step3", "global_step9")
    assert code == 1 and out.splitlines() == [f"{s3_url}/global_step9: not a ds_fastckpt checkpoint (no "
                                              f"{MANIFEST_NAME})", f"1 problem(s) found in {s3_url}"]


def test_prune_deletes_only_unkept_checkpoints_of_ours(tier, s3_url, capsys, monkeypatch):
    tier.put_bytes("notours/x", b"a user's file")
    tier.put_bytes("global_step7/extra.bin", b"a tag without manifest or reports")
    unfinished_upload(tier, "global_step8")
    before = remote_keys(tier, "")
    code, out, _ = run(capsys, "prune", s3_url, "--keep-last", "1", "--dry-run")
    lines = out.splitlines()
    assert code == 0 and lines[1:] == [f"would delete {s3_url}/global_step1", f"would delete {s3_url}/global_step2"]
    assert lines[0].startswith(f"left global_step8 in {s3_url}: an unfinished upload changed ")
    assert lines[0].endswith(" ago may still be running (--leftovers-older-than 3600)")
    assert remote_keys(tier, "") == before

    deleted = []
    real_delete = S3Store.delete

    def recording_delete(store, keys):
        deleted.append(list(keys))
        real_delete(store, deleted[-1])

    monkeypatch.setattr(S3Store, "delete", recording_delete)
    code, out, _ = run(capsys, "prune", s3_url, "--keep-last", "1")
    assert code == 0 and out.splitlines()[1:] == [f"deleted {s3_url}/global_step1", f"deleted {s3_url}/global_step2"]
    assert deleted[0] == [layout.manifest_key("global_step1")]  # first: the tag stops being complete
    code, out, _ = run(capsys, "prune", s3_url, "--keep-last", "1", "--leftovers-older-than", "0")
    assert code == 0 and out.splitlines() == [f"deleted {s3_url}/global_step8"]
    assert remote_keys(tier, "") == sorted(key for key in before if key.split("/")[0] in
                                           ("notours", "global_step7", "global_step3", "latest"))


def test_ls_save_dir_shows_what_the_remote_tier_holds(saved, tier, s3_url, seaweed, tmp_path, capsys):
    save_dir = tmp_path / "ckpts"
    shutil.copytree(saved, save_dir, symlinks=True)
    # global_step1 is gone remotely, global_step3 holds other content, global_step6 exists only remotely.
    tier.delete([layout.manifest_key("global_step1")])
    upload(tier, saved, "global_step1", as_tag="global_step3")
    upload(tier, saved, "global_step2", as_tag="global_step6", set_latest=False)
    (save_dir / REMOTE_NOTE_NAME).write_text(json.dumps({"url": s3_url, "endpoint_url": seaweed.endpoint_url}))
    code, out, err = run(capsys, "ls", save_dir)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert "REPLICATED" in lines[0]
    assert [line.split()[:3] + [line.split()[7]] for line in lines[1:4]] == [
        ["global_step1", "1", "complete", "-"], ["global_step2", "2", "complete", "yes"],
        ["global_step3", "3", "complete", "differs"]]
    assert lines[4] == "remote only: global_step6"
    code, out, _ = run(capsys, "ls", save_dir, "--json")
    assert [row["replicated"] for row in json.loads(out)] == [False, True, "differs"]

    (save_dir / REMOTE_NOTE_NAME).write_text("not json")
    code, out, err = run(capsys, "ls", save_dir)
    assert code == 0 and "REPLICATED" not in out and f"ignoring {save_dir / REMOTE_NOTE_NAME}" in err
    code, out, err = run(capsys, "ls", save_dir, "--json", "--remote", s3_url)
    assert code == 0 and [row["replicated"] for row in json.loads(out)] == [False, True, "differs"]


def test_an_unreachable_tier_names_url_and_endpoint_never_the_secret(saved, s3_url, seaweed, tmp_path, capsys):
    endpoint = "http://127.0.0.1:9"
    code, out, err = run(capsys, "ls", s3_url, "--endpoint-url", endpoint)
    assert code == 1 and out == ""
    assert s3_url in err and "127.0.0.1:9" in err and seaweed.secret_key not in err
    save_dir = tmp_path / "ckpts"
    shutil.copytree(saved, save_dir, symlinks=True)
    (save_dir / REMOTE_NOTE_NAME).write_text(json.dumps({"url": s3_url, "endpoint_url": endpoint}))
    code, out, err = run(capsys, "ls", save_dir)
    assert code == 0 and "cannot tell which checkpoints are replicated" in err and "127.0.0.1:9" in err
    assert seaweed.secret_key not in err
    assert [line.split()[7] for line in out.splitlines()[1:4]] == ["?", "?", "?"]


def test_listings_say_when_each_object_was_written(remote_url, seaweed):
    """What ``prune`` tells a live upload from an interrupted one by."""
    store = store_of(remote_url, seaweed)
    before = time.time()
    store.put_bytes("global_step1/a", b"a")
    [entry] = store.list_keys("global_step1/")
    assert before - 2 <= entry.modified <= time.time() + 1  # S3 says it to the second
    store.close()
