"""Both stores, through the same tests: S3 on a real SeaweedFS server, and a directory (the shared filesystem's).

What is asserted is what a reader of the store would see: the objects
listed and their bytes, unfinished uploads, files on the local disk, and
(through the autouse ``check_fd_leaks``) no descriptor left open.
"""

import errno
import os
import random
import socket
import sys
import threading
import time

import google_crc32c
import pytest

from ds_fastckpt.remote import fs_store, s3_store
from ds_fastckpt.remote.fs_store import FsStore
from ds_fastckpt.remote.s3_store import S3Store
from ds_fastckpt.remote.store import (RemoteError, RemoteIntegrityError, RemoteObject, RemoteObjectTooLargeError,
                                      RemoteUnavailableError)
from ds_fastckpt.remote.url import check_url, open_store

PART = 5 << 20  # S3's (and SeaweedFS's) smallest part but the last
SIZES = {"empty": 0, "small": 1000, "one_part": PART, "three_and_a_half_parts": PART * 7 // 2}


def open_test_store(url, **overrides):
    options = dict(part_size=PART, concurrency=4, request_timeout_s=5)
    options.update(overrides)
    return open_store(url, **options)


@pytest.fixture
def store(remote_url):
    opened = open_test_store(remote_url)
    yield opened
    opened.close()


def make_file(path, size, seed=0):
    """A file of ``size`` random bytes; returns (size, CRC-32C) by an implementation other than the store's."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return size, google_crc32c.value(data)


def unfinished_uploads(store, request):
    """Keys with an upload that was started and neither completed nor aborted."""
    if isinstance(store, FsStore):
        return sorted(name for _, _, names in os.walk(store.root) for name in names
                      if name.endswith(fs_store.TEMP_SUFFIX))
    client = request.getfixturevalue("seaweed").client()
    return sorted(upload["Key"] for upload in client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []))


def start_unfinished_upload(store, key, request):
    """An upload of ``key`` interrupted half-way: a multipart upload never completed, or a temporary file."""
    if isinstance(store, FsStore):
        directory, _, name = key.rpartition("/")
        os.makedirs(os.path.join(store.root, directory), exist_ok=True)
        with open(os.path.join(store.root, directory, fs_store.temp_name(name)), "wb") as temporary:
            temporary.write(b"half")
        return
    request.getfixturevalue("seaweed").client().create_multipart_upload(Bucket=store.bucket, Key=f"run/{key}")


def messages(error):
    """The messages of ``error`` and of every exception it was raised from."""
    found = []
    while error is not None:
        found.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(found)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_a_file_goes_up_and_comes_back_the_same(store, tmp_path, size):
    size, crc = make_file(tmp_path / "local", size)
    store.upload_file(tmp_path / "local", "global_step1/model.pt", size=size, crc32c=crc)
    assert store.list_keys("global_step1/") == [RemoteObject("global_step1/model.pt", size)]
    store.download_file("global_step1/model.pt", tmp_path / "back", size=size, crc32c=crc)
    assert (tmp_path / "back").read_bytes() == (tmp_path / "local").read_bytes()


@pytest.mark.parametrize("size", [SIZES["small"], SIZES["three_and_a_half_parts"]], ids=["small", "multipart"])
def test_an_upload_whose_crc_differs_leaves_nothing(store, tmp_path, size, request):
    size, crc = make_file(tmp_path / "local", size)
    with pytest.raises(RemoteIntegrityError) as raised:
        store.upload_file(tmp_path / "local", "t/model.pt", size=size, crc32c=crc ^ 1)
    assert "'t/model.pt'" in str(raised.value) and str(tmp_path / "local") in str(raised.value)
    assert f"{crc ^ 1:#010x}" in str(raised.value) and f"{crc:#010x}" in str(raised.value)
    assert store.list_keys("") == []
    assert unfinished_uploads(store, request) == []


def test_an_upload_of_a_file_of_another_size_leaves_nothing(store, tmp_path, request):
    size, crc = make_file(tmp_path / "local", 1000)
    with pytest.raises(RemoteIntegrityError, match="records 1001 bytes, the file has 1000"):
        store.upload_file(tmp_path / "local", "t/model.pt", size=size + 1, crc32c=crc)
    assert store.list_keys("") == [] and unfinished_uploads(store, request) == []


@pytest.mark.parametrize("size", [SIZES["small"], SIZES["three_and_a_half_parts"]], ids=["small", "multipart"])
def test_a_download_of_other_bytes_leaves_no_local_file(store, tmp_path, size):
    size, crc = make_file(tmp_path / "local", size)
    store.upload_file(tmp_path / "local", "t/model.pt", size=size, crc32c=crc)
    with pytest.raises(RemoteIntegrityError, match="the object has"):
        store.download_file("t/model.pt", tmp_path / "back", size=size + 1, crc32c=crc)
    assert not (tmp_path / "back").exists()
    with pytest.raises(RemoteIntegrityError, match=f"{crc ^ 1:#010x}"):
        store.download_file("t/model.pt", tmp_path / "back", size=size, crc32c=crc ^ 1)
    assert not (tmp_path / "back").exists()


def test_a_missing_object_is_file_not_found(store, tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        store.download_file("t/missing.pt", tmp_path / "back", size=1, crc32c=0)
    assert raised.value.errno == errno.ENOENT and raised.value.filename == "t/missing.pt"
    assert not (tmp_path / "back").exists()


def test_a_download_never_replaces_or_follows_what_is_there(store, tmp_path):
    size, crc = make_file(tmp_path / "local", 1000)
    store.upload_file(tmp_path / "local", "t/model.pt", size=size, crc32c=crc)
    (tmp_path / "existing").write_bytes(b"keep")
    (tmp_path / "target").write_bytes(b"keep")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for path in ("existing", "link", "dangling"):
        with pytest.raises(FileExistsError):
            store.download_file("t/model.pt", tmp_path / path, size=size, crc32c=crc)
    assert (tmp_path / "existing").read_bytes() == b"keep" and (tmp_path / "target").read_bytes() == b"keep"
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "dangling").is_symlink()


def test_get_bytes_reads_at_most_its_limit(store):
    assert store.get_bytes("latest", 10) is None
    store.put_bytes("latest", b"global_step1")
    store.put_bytes("latest", b"global_step2")  # replaces
    assert store.get_bytes("latest", 12) == b"global_step2"
    with pytest.raises(RemoteObjectTooLargeError, match="'latest' is larger than 11 bytes"):
        store.get_bytes("latest", 11)
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty", 0) == b""


def test_a_name_of_255_bytes_is_an_object_like_any_other(store, tmp_path):
    key = "t/" + "n" * 255
    size, crc = make_file(tmp_path / "local", 1000)
    store.upload_file(tmp_path / "local", key, size=size, crc32c=crc)
    store.download_file(key, tmp_path / "back", size=size, crc32c=crc)
    assert store.list_keys("t/") == [RemoteObject(key, size)]


def test_list_keys_list_tags_and_delete(store, tmp_path, monkeypatch):
    monkeypatch.setattr(s3_store, "_DELETE_BATCH", 2)  # the batches of delete_objects, without 1001 objects
    for key in ("t1/a", "t1/sub/b", "t2/c", "t10/d", "latest"):
        store.put_bytes(key, key.encode())
    assert sorted(store.list_keys("t1/"), key=lambda entry: entry.key) == [RemoteObject("t1/a", 4),
                                                                           RemoteObject("t1/sub/b", 8)]
    assert sorted(entry.key for entry in store.list_keys("t1")) == ["t1/a", "t1/sub/b", "t10/d"]
    assert len(store.list_keys("")) == 5 and store.list_keys("t3/") == []
    assert sorted(store.list_tags()) == ["t1", "t10", "t2"]
    store.delete(["t1/a", "t1/sub/b", "t1/missing", "t1"])
    assert store.list_keys("t1/") == [] and sorted(store.list_tags()) == ["t10", "t2"]
    assert store.get_bytes("t2/c", 10) == b"t2/c"
    if isinstance(store, FsStore):  # the directories left empty go, the root stays
        assert sorted(os.listdir(store.root)) == ["latest", "t10", "t2"]
        store.delete(["t2/c", "t10/d", "latest"])
        assert os.listdir(store.root) == []


def test_abort_uploads_ends_the_interrupted_uploads_under_a_prefix(store, request):
    start_unfinished_upload(store, "t1/model.pt", request)
    start_unfinished_upload(store, "t1/sub/optim.pt", request)
    start_unfinished_upload(store, "t2/model.pt", request)
    assert store.list_keys("") == [] and store.list_tags() == []  # an unfinished upload is no object
    assert store.abort_uploads("t1/") == 2
    assert store.abort_uploads("t1/") == 0
    assert len(unfinished_uploads(store, request)) == 1
    assert store.abort_uploads("") == 1 and unfinished_uploads(store, request) == []


def test_several_threads_share_one_store(store, tmp_path):
    files = {f"t/rank{rank}.pt": make_file(tmp_path / f"rank{rank}.pt", PART * 3 // 2, seed=rank) for rank in range(4)}
    failures = []

    def upload(key, size, crc):
        try:
            store.upload_file(tmp_path / key.split("/")[1], key, size=size, crc32c=crc)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=upload, args=(key, *facts)) for key, facts in files.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for key, (size, crc) in files.items():
        store.download_file(key, tmp_path / f"{key.split('/')[1]}.back", size=size, crc32c=crc)


@pytest.mark.parametrize("key", ["../escape", "/absolute", "a//b", "a/./b", "a/..", ""])
def test_keys_that_would_leave_the_prefix_are_refused(store, tmp_path, key):
    (tmp_path / "local").write_bytes(b"x")
    for call in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key, 10), lambda: store.delete([key]),
                 lambda: store.upload_file(tmp_path / "local", key, size=1, crc32c=google_crc32c.value(b"x")),
                 lambda: store.download_file(key, tmp_path / "back", size=1, crc32c=0)):
        with pytest.raises(ValueError):
            call()
    assert not (tmp_path / "back").exists() and not (tmp_path / "escape").exists()


def test_s3_an_object_replaced_during_a_download_fails_it(s3_url, seaweed, tmp_path, monkeypatch):
    store = open_test_store(s3_url)
    size, crc = make_file(tmp_path / "local", PART * 3 // 2)
    store.upload_file(tmp_path / "local", "t/model.pt", size=size, crc32c=crc)
    head_object = store._client.head_object

    def head_then_replace(**kwargs):
        head = head_object(**kwargs)
        seaweed.client().put_object(Bucket=store.bucket, Key="run/t/model.pt", Body=os.urandom(size))
        return head

    monkeypatch.setattr(store._client, "head_object", head_then_replace)
    with pytest.raises(RemoteIntegrityError, match="replaced or deleted while it was downloaded"):
        store.download_file("t/model.pt", tmp_path / "back", size=size, crc32c=crc)
    assert not (tmp_path / "back").exists()
    store.close()


def test_s3_the_server_checks_the_crc32c_sent_with_the_bytes(s3_url, tmp_path, monkeypatch, request):
    """What SeaweedFS does with ``ChecksumCRC32C``: bytes that do not match it are refused, whole or in parts."""
    store = open_test_store(s3_url)
    checksum_header = s3_store._checksum_header
    monkeypatch.setattr(s3_store, "_checksum_header", lambda crc: checksum_header(crc ^ 1))  # damaged on the way
    with pytest.raises(RemoteUnavailableError, match="BadDigest"):
        store.put_bytes("latest", b"global_step1")
    for name, size in (("small", 1000), ("multipart", PART * 3 // 2)):
        size, crc = make_file(tmp_path / name, size)
        with pytest.raises(RemoteUnavailableError, match="BadDigest"):
            store.upload_file(tmp_path / name, f"t/{name}", size=size, crc32c=crc)
    assert store.list_keys("") == [] and unfinished_uploads(store, request) == []
    store.close()


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_s3_an_unreachable_endpoint_is_unavailable_quickly_and_names_no_secret(s3_url, tmp_path, monkeypatch):
    secret = "ds-fastckpt-DO-NOT-SHOW-7f3a9c"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    store = open_test_store(s3_url, endpoint_url=endpoint, request_timeout_s=0.5)
    size, crc = make_file(tmp_path / "local", 1000)
    for call in (store.check_reachable, lambda: store.get_bytes("latest", 10),
                 lambda: store.upload_file(tmp_path / "local", "t/model.pt", size=size, crc32c=crc)):
        started = time.monotonic()
        with pytest.raises(RemoteUnavailableError) as raised:
            call()
        assert time.monotonic() - started < 5
        assert s3_url in str(raised.value) and endpoint in str(raised.value)
        assert secret not in messages(raised.value)
    store.close()


def test_s3_a_hung_server_times_out_as_unavailable(s3_url, seaweed):
    store = open_test_store(s3_url, request_timeout_s=0.5)
    store.put_bytes("latest", b"global_step1")
    seaweed.stop()
    try:
        started = time.monotonic()
        with pytest.raises(RemoteUnavailableError, match="timeout"):
            store.get_bytes("latest", 100)
        assert time.monotonic() - started < 6
    finally:
        seaweed.cont()
    assert store.get_bytes("latest", 100) == b"global_step1"
    store.close()


def test_s3_a_wrong_secret_is_unavailable_and_never_shown(s3_url, monkeypatch):
    wrong = "ds-fastckpt-WRONG-SECRET-1b2c3d"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    store = open_test_store(s3_url)
    for call in (store.check_reachable, lambda: store.put_bytes("latest", b"x"), lambda: store.list_tags()):
        with pytest.raises(RemoteUnavailableError) as raised:
            call()
        assert s3_url in str(raised.value) and wrong not in messages(raised.value)
    store.close()


def test_s3_no_credentials_are_unavailable(s3_url, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_test_store(s3_url)
    with pytest.raises(RemoteUnavailableError, match="credentials"):
        store.check_reachable()
    store.close()


def test_s3_a_missing_bucket_is_unavailable(s3_url, tmp_path):
    url = "s3://b-no-such-bucket-4e1d/run"
    store = open_test_store(url)
    with pytest.raises(RemoteUnavailableError, match="bucket 'b-no-such-bucket-4e1d' does not exist"):
        store.check_reachable()
    with pytest.raises(RemoteUnavailableError, match="NoSuchBucket"):
        store.get_bytes("latest", 10)
    with pytest.raises(RemoteUnavailableError, match="does not exist"):  # not "no such object"
        store.download_file("t/model.pt", tmp_path / "back", size=1, crc32c=0)
    assert not (tmp_path / "back").exists()
    store.close()


def test_fs_symlinks_under_the_root_are_never_followed(tmp_path):
    root, outside = tmp_path / "remote", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "model.pt").write_bytes(b"outside")
    (root / "t1").symlink_to(outside)
    (root / "latest").symlink_to(outside / "model.pt")
    store = open_test_store(str(root))
    size, crc = make_file(tmp_path / "local", 10)
    for call in (lambda: store.put_bytes("t1/x", b"x"), lambda: store.get_bytes("t1/model.pt", 100),
                 lambda: store.upload_file(tmp_path / "local", "t1/x", size=size, crc32c=crc),
                 lambda: store.download_file("t1/model.pt", tmp_path / "back", size=7, crc32c=0),
                 lambda: store.get_bytes("latest", 100), lambda: store.list_keys("t1/")):
        with pytest.raises(OSError) as raised:
            call()
        assert raised.value.errno == errno.ELOOP and raised.value.filename.startswith(str(root / "t1")) \
            or raised.value.filename == str(root / "latest")
    assert store.list_keys("") == [] and store.list_tags() == []
    store.put_bytes("latest", b"t2")  # replaces the symlink itself, writes nothing through it
    assert not (root / "latest").is_symlink() and (outside / "model.pt").read_bytes() == b"outside"
    assert os.listdir(outside) == ["model.pt"] and not (tmp_path / "back").exists()
    store.close()


def test_fs_check_reachable_needs_a_directory_it_can_write(tmp_path):
    open_test_store(str(tmp_path / "new" / "remote")).check_reachable()  # made with its parents
    assert (tmp_path / "new" / "remote").is_dir() and os.listdir(tmp_path / "new" / "remote") == []
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(RemoteUnavailableError, match=str(tmp_path / "file" / "remote")):
        open_test_store(str(tmp_path / "file" / "remote")).check_reachable()


@pytest.mark.parametrize("url, problem", [
    ("s3://bucket/run42", None), ("s3://my.bucket-1", None), ("s3://bucket/a/b/", None), ("/lustre/ckpt", None),
    ("s3://", "names no bucket"), ("s3:///run", "names no bucket"), ("s3://Bucket/run", "bucket name"),
    ("s3://ab/run", "bucket name"), ("s3://192.168.1.1/run", "IP address"), ("s3://a..b/run", "dots"),
    ("s3://bucket/../x", "prefix"), ("s3://bucket//x", "prefix"), ("/lustre/../etc", "'..'"), ("/", "root"),
    ("relative/path", "not an s3://"), ("gs://bucket/x", "not an s3://"), ("", "empty"),
])
def test_check_url(url, problem):
    found = check_url(url)
    assert (found is None) if problem is None else (problem in found), found


def test_open_store_picks_the_store_of_the_url(tmp_path):
    assert isinstance(open_test_store(str(tmp_path)), FsStore)
    assert isinstance(open_test_store("s3://bucket/run", endpoint_url="http://127.0.0.1:1"), S3Store)
    with pytest.raises(ValueError, match="not an s3://"):
        open_test_store("gs://bucket/run")
    with pytest.raises(ValueError, match="smallest multipart part"):
        open_test_store("s3://bucket/run", part_size=1 << 20)


def test_open_store_without_boto3_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.delitem(sys.modules, "ds_fastckpt.remote.s3_store")
    with pytest.raises(RemoteError, match=r"pip install 'ds_fastckpt\[s3\]'"):
        open_test_store("s3://bucket/run")
