"""PosixStorage on tmp dirs: each operation keeps its contract; every caller reaches storage through the accessor."""

import errno
import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ds_fastckpt import storage
from ds_fastckpt.decisions.deleter import delete_checkpoint
from ds_fastckpt.decisions.disk_guard import InsufficientSpaceError, ensure_space
from ds_fastckpt.format import save_dir_lock
from ds_fastckpt.format.atomicity import atomic_write_bytes, fsync_dir, publish_dir
from ds_fastckpt.format.manifest import FileRecord, Manifest, write_manifest
from ds_fastckpt.format.names import LOCK_NAME, pending_path
from ds_fastckpt.format.records import complete_checkpoints, scan
from ds_fastckpt.format.small_files import read_small_file
from ds_fastckpt.storage import EntryKind, LockHeldError, PosixStorage, RefusedEntryError, Storage, UnsafeSmallFileError


@pytest.fixture
def posix():
    return PosixStorage()


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_accessor_gives_the_posix_backend_and_the_base_is_abstract(tmp_path):
    assert isinstance(storage.storage_for(tmp_path), PosixStorage)
    with pytest.raises(TypeError, match="abstract"):
        Storage()


def test_atomic_write_replaces_the_content_and_leaves_no_temp(tmp_path, posix):
    path = tmp_path / "latest"
    path.write_bytes(b"old")
    posix.write_atomic(path, b"new", tmp_path / ".latest.1.tmp")
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["latest"]


def test_readers_see_the_old_or_the_new_content_never_a_mix(tmp_path, posix):
    path = tmp_path / "latest"
    contents = [bytes([letter]) * 65536 for letter in b"abcdefgh"]
    path.write_bytes(contents[0])
    seen, done = set(), threading.Event()

    def read_until_done():
        while not done.is_set():
            seen.add(path.read_bytes())

    reader = threading.Thread(target=read_until_done)
    reader.start()
    try:
        for index in range(200):
            posix.write_atomic(path, contents[index % len(contents)], tmp_path / f".latest.{index}.tmp", fsync=False)
    finally:
        done.set()
        reader.join()
    assert seen and seen <= set(contents)


def test_a_failed_replace_keeps_the_old_content_and_removes_the_temp(tmp_path, posix, monkeypatch):
    path, temp = tmp_path / "latest", tmp_path / ".latest.1.tmp"
    path.write_bytes(b"old")

    def failing_replace(source, destination):
        raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(destination))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError) as raised:
        posix.write_atomic(path, b"new", temp)
    assert (raised.value.errno, raised.value.filename) == (errno.EIO, str(path))
    assert path.read_bytes() == b"old" and not os.path.lexists(temp)


def test_a_symlink_planted_at_the_temp_name_is_refused_not_followed(tmp_path, posix):
    victim = tmp_path / "victims_file"
    victim.write_text("precious")
    save_dir = tmp_path / "shared"
    save_dir.mkdir()
    path, temp = save_dir / "latest", save_dir / ".latest.1.tmp"
    path.write_bytes(b"old")
    temp.symlink_to(victim)
    with pytest.raises(FileExistsError) as raised:
        posix.write_atomic(path, b"new", temp)
    assert raised.value.filename == str(temp)
    assert victim.read_text() == "precious" and path.read_bytes() == b"old"
    assert temp.is_symlink()  # not ours: left where its owner put it


def test_a_symlink_at_the_path_is_replaced_itself_not_written_through(tmp_path, posix):
    victim = tmp_path / "victims_file"
    victim.write_text("precious")
    path = tmp_path / "latest"
    path.symlink_to(victim)
    posix.write_atomic(path, b"new", tmp_path / ".latest.1.tmp")
    assert not path.is_symlink() and path.read_bytes() == b"new"
    assert victim.read_text() == "precious"


def test_exchange_swaps_two_directories(tmp_path, posix):
    first, second = tmp_path / "first", tmp_path / "second"
    for directory in (first, second):
        directory.mkdir()
        (directory / "which").write_text(directory.name)
    posix.exchange(first, second)
    assert (first / "which").read_text() == "second" and (second / "which").read_text() == "first"


def test_exchange_with_a_missing_entry_names_both_and_changes_nothing(tmp_path, posix):
    first = tmp_path / "first"
    first.mkdir()
    with pytest.raises(OSError) as raised:
        posix.exchange(first, tmp_path / "missing")
    assert raised.value.errno == errno.ENOENT and raised.value.filename == str(tmp_path / "missing")
    assert "renameat2 RENAME_EXCHANGE" in str(raised.value) and str(first) in str(raised.value)
    assert first.is_dir()


def test_rename_moves_a_directory(tmp_path, posix):
    (tmp_path / "pending").mkdir()
    posix.rename(tmp_path / "pending", tmp_path / "final")
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_remove_tree_unlinks_a_symlink_inside_without_touching_its_target(tmp_path, posix):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("keep")
    (tmp_path / "outside_file").write_text("keep too")
    trash = tmp_path / "trash"
    (trash / "nested").mkdir(parents=True)
    (trash / "nested" / "model.pt").write_bytes(b"x")
    (trash / "link_to_dir").symlink_to(outside)
    (trash / "nested" / "link_to_file").symlink_to(tmp_path / "outside_file")
    posix.remove_tree(trash)
    assert not os.path.lexists(trash)
    assert (outside / "sentinel").read_text() == "keep" and (tmp_path / "outside_file").read_text() == "keep too"


def test_remove_tree_refuses_a_symlink_to_a_directory(tmp_path, posix):
    real = tmp_path / "real"
    real.mkdir()
    (real / "data").write_text("keep")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError):
        posix.remove_tree(tmp_path / "link")
    assert (real / "data").read_text() == "keep"


def test_entry_kinds_never_follow_a_symlink(tmp_path, posix):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link_to_dir").symlink_to(tmp_path / "dir")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo")
    kinds = {name: posix.entry_kind(tmp_path / name) for name in os.listdir(tmp_path)}
    assert kinds == {"dir": EntryKind.DIRECTORY, "file": EntryKind.FILE, "link_to_dir": EntryKind.SYMLINK,
                     "dangling": EntryKind.SYMLINK, "fifo": EntryKind.OTHER}
    assert posix.entry_kind(tmp_path / "nowhere") is None
    assert posix.is_real_dir(tmp_path / "dir") and not posix.is_real_dir(tmp_path / "link_to_dir")
    assert not posix.is_real_dir(tmp_path / "nowhere")
    assert posix.exists(tmp_path / "dangling") and not posix.exists(tmp_path / "nowhere")
    assert not posix.exists(tmp_path / "file" / "below_a_file")  # ENOTDIR: as os.path.lexists
    assert sorted(posix.subdirectories(tmp_path)) == ["dir"]


def test_make_dir_and_remove_file(tmp_path, posix):
    posix.make_dir(tmp_path / "a" / "b", parents=True)
    posix.make_dir(tmp_path / "a" / "b", exist_ok=True)
    with pytest.raises(FileExistsError):
        posix.make_dir(tmp_path / "a" / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        posix.make_dir(tmp_path / "file", exist_ok=True)
    (tmp_path / "link").symlink_to(tmp_path / "file")
    posix.remove_file(tmp_path / "link")
    assert (tmp_path / "file").read_text() == "x"
    posix.remove_file(tmp_path / "link", missing_ok=True)
    with pytest.raises(FileNotFoundError) as raised:
        posix.remove_file(tmp_path / "link")
    assert raised.value.filename == str(tmp_path / "link")


def test_sync_dir_errors_carry_errno_and_path_and_are_not_retried(tmp_path, posix, monkeypatch):
    with pytest.raises(FileNotFoundError) as raised:
        posix.sync_dir(tmp_path / "missing")
    assert raised.value.filename == str(tmp_path / "missing")
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    before = open_fd_count()
    with pytest.raises(OSError, match="fsync") as raised:
        posix.sync_dir(tmp_path)
    assert (raised.value.errno, raised.value.filename, len(calls)) == (errno.EIO, str(tmp_path), 1)
    assert open_fd_count() == before


def test_read_small_refuses_links_fifos_and_large_files(tmp_path, posix):
    (tmp_path / "latest").write_bytes(b"global_step1")
    assert posix.read_small(tmp_path / "latest", 100) == b"global_step1"
    (tmp_path / "link").symlink_to(tmp_path / "latest")
    os.mkfifo(tmp_path / "fifo")
    for name, code in (("link", errno.ELOOP), ("fifo", errno.EINVAL), ("latest", errno.EFBIG)):
        with pytest.raises(UnsafeSmallFileError) as raised:
            posix.read_small(tmp_path / name, 4)
        assert (raised.value.errno, raised.value.filename) == (code, str(tmp_path / name))


def test_free_bytes_is_what_the_filesystem_reports(tmp_path, posix):
    stats = os.statvfs(tmp_path)
    assert abs(posix.free_bytes(tmp_path) - stats.f_bavail * stats.f_frsize) < 64 << 20


def test_a_second_lock_is_refused_with_the_holder_and_a_replaced_file_is_not_current(tmp_path, posix):
    path = tmp_path / LOCK_NAME
    before = open_fd_count()
    lock = posix.lock_exclusive(path, b"pid 1 on here\n")
    with pytest.raises(LockHeldError) as raised:  # flock excludes another open file, even in this process
        posix.lock_exclusive(path, b"pid 2 on there\n")
    assert (raised.value.errno, raised.value.filename, raised.value.holder) == (
        errno.EWOULDBLOCK, str(path), b"pid 1 on here\n")
    assert path.read_bytes() == b"pid 1 on here\n" and lock.is_current()
    path.unlink()
    assert not lock.is_current()
    lock.release()
    lock.release()
    assert open_fd_count() == before


@pytest.mark.parametrize("plant", ["fifo", "hard link", "symlink"])
def test_a_lock_file_that_is_not_a_plain_file_is_refused(tmp_path, posix, plant):
    victim = tmp_path / "victims_file"
    victim.write_text("precious")
    path = tmp_path / LOCK_NAME
    if plant == "fifo":
        os.mkfifo(path)
    elif plant == "hard link":
        os.link(victim, path)
    else:
        path.symlink_to(victim)
    before = open_fd_count()
    with pytest.raises(OSError) as raised:
        posix.lock_exclusive(path, b"pid 1\n")
    expected = (RefusedEntryError, errno.EPERM) if plant != "symlink" else (OSError, errno.ELOOP)
    assert isinstance(raised.value, expected[0]) and raised.value.errno == expected[1]
    assert raised.value.filename == str(path) and victim.read_text() == "precious"
    assert open_fd_count() == before


class RecordingStorage(Storage):
    """A backend that records each operation and hands it to the POSIX one: what a new backend plugs into."""

    def __init__(self):
        self.inner = PosixStorage()
        self.calls = []

    def _call(self, name, *args, **kwargs):
        self.calls.append(name)
        return getattr(self.inner, name)(*args, **kwargs)

    def write_atomic(self, path, data, temp, *, fsync=True):
        return self._call("write_atomic", path, data, temp, fsync=fsync)

    def read_small(self, path, limit):
        return self._call("read_small", path, limit)

    def sync_dir(self, path):
        return self._call("sync_dir", path)

    def make_dir(self, path, *, parents=False, exist_ok=False):
        return self._call("make_dir", path, parents=parents, exist_ok=exist_ok)

    def rename(self, source, destination):
        return self._call("rename", source, destination)

    def exchange(self, first, second):
        return self._call("exchange", first, second)

    def remove_file(self, path, *, missing_ok=False):
        return self._call("remove_file", path, missing_ok=missing_ok)

    def remove_tree(self, path):
        return self._call("remove_tree", path)

    def entry_kind(self, path):
        return self._call("entry_kind", path)

    def make_sized_file(self, path, size, *, keep_blocks=False):
        return self._call("make_sized_file", path, size, keep_blocks=keep_blocks)

    def subdirectories(self, path):
        return self._call("subdirectories", path)

    def free_bytes(self, path):
        self.calls.append("free_bytes")
        return 0  # a full disk, as this backend reports it

    def lock_exclusive(self, path, content):
        return self._call("lock_exclusive", path, content)


def manifest_for(tag: str, sequence: int) -> Manifest:
    return Manifest(tag=tag, step=sequence, sequence=sequence, committed_unix_ns=sequence, world_size=1,
                    deepspeed_version="x", ds_fastckpt_version="y",
                    files=[FileRecord(path="model.pt", bytes=7, crc32c=1)])


def commit_by_hand(save_dir: Path, tag: str, sequence: int) -> None:
    pending = pending_path(save_dir, tag)
    pending.mkdir()
    (pending / "model.pt").write_bytes(b"weights")
    write_manifest(pending, manifest_for(tag, sequence))
    publish_dir(pending, save_dir / tag)


def test_a_substituted_backend_serves_commit_scan_rotation_space_and_lock(tmp_path, monkeypatch):
    recording = RecordingStorage()
    monkeypatch.setattr(storage, "storage_for", lambda path: recording)
    save_dir = tmp_path / "ckpts"
    save_dir.mkdir()
    commit_by_hand(save_dir, "global_step1", 1)
    commit_by_hand(save_dir, "global_step2", 2)
    commit_by_hand(save_dir, "global_step2", 3)  # saved again: exchanged with the old copy
    atomic_write_bytes(save_dir / "latest", b"global_step2")
    fsync_dir(save_dir)
    assert read_small_file(save_dir / "latest") == b"global_step2"
    records = scan(save_dir)
    assert [record.name for record in complete_checkpoints(records)] == ["global_step1", "global_step2"]
    delete_checkpoint(save_dir, records[0])
    old_copy = [record for record in scan(save_dir) if record.leftover]
    delete_checkpoint(save_dir, old_copy[0])
    assert sorted(os.listdir(save_dir)) == ["global_step2", "latest"]
    with pytest.raises(InsufficientSpaceError):  # the free space this backend reports, not the disk's
        ensure_space(save_dir, scan(save_dir), [lambda: 0])
    save_dir_lock.acquire(save_dir)
    try:
        save_dir_lock.recheck(save_dir)
    finally:
        save_dir_lock.release(save_dir)
    assert set(recording.calls) == {"write_atomic", "read_small", "sync_dir", "rename", "exchange", "remove_tree",
                                    "entry_kind", "subdirectories", "free_bytes", "lock_exclusive"}
    assert (save_dir / LOCK_NAME).read_bytes().startswith(f"pid {os.getpid()} ".encode())


def test_take_for_overwrite_moves_a_file_nothing_else_holds(tmp_path, posix):
    (tmp_path / "spare.pt").write_bytes(b"old")
    inode = os.stat(tmp_path / "spare.pt").st_ino
    assert posix.take_for_overwrite(tmp_path / "spare.pt", tmp_path / "new.pt") is True
    assert os.listdir(tmp_path) == ["new.pt"]
    assert os.stat(tmp_path / "new.pt").st_ino == inode


def hold_open_in_another_process(path):
    """A second process that has ``path`` open until its stdin closes (a reader of an old checkpoint)."""
    reader = subprocess.Popen([sys.executable, "-c", f"f = open({str(path)!r}, 'rb'); print('open', flush=True); "
                               "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "open\n"
    return reader


@pytest.mark.parametrize("holder", ["hard link", "symlink", "fifo", "open in another process", "mapped here",
                                    "missing", "directory"])
def test_take_for_overwrite_refuses_what_someone_else_may_hold_and_moves_nothing(tmp_path, posix, holder):
    source, destination = tmp_path / "spare.pt", tmp_path / "new.pt"
    target = tmp_path / "kept_by_the_user.pt"
    target.write_bytes(b"theirs")
    closers = []
    if holder == "hard link":
        os.link(target, source)
    elif holder == "symlink":
        source.symlink_to(target)
    elif holder == "fifo":
        os.mkfifo(source)
    elif holder == "directory":
        source.mkdir()
    elif holder != "missing":
        source.write_bytes(b"old")
        if holder == "open in another process":
            reader = hold_open_in_another_process(source)
            closers.append(lambda: (reader.stdin.close(), reader.wait()))
        else:
            with open(source, "rb") as file:
                mapped = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
            closers.append(mapped.close)
    before = sorted(os.listdir(tmp_path))
    fds = open_fd_count()
    try:
        assert posix.take_for_overwrite(source, destination) is False
        assert sorted(os.listdir(tmp_path)) == before
        assert open_fd_count() == fds
        assert target.read_bytes() == b"theirs"
    finally:
        for close in closers:
            close()


def test_take_for_overwrite_refuses_a_file_of_another_user(tmp_path, posix):
    if os.geteuid() != 0:
        pytest.skip("needs root to own a file as another user")
    source = tmp_path / "spare.pt"
    source.write_bytes(b"old")  # root's, readable by all, in a directory anyone may rename in
    os.chmod(source, 0o644)
    os.chmod(tmp_path, 0o777)
    os.chmod(tmp_path.parent, 0o755)
    child = os.fork()
    if child == 0:  # a job running as a second user must not write over a file it does not own
        os.setgid(65534)
        os.setuid(65534)
        os._exit(0 if posix.take_for_overwrite(source, tmp_path / "new.pt") is False else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.listdir(tmp_path) == ["spare.pt"]


def test_the_base_storage_never_recycles(tmp_path):
    (tmp_path / "spare.pt").write_bytes(b"old")
    assert Storage.take_for_overwrite(PosixStorage(), tmp_path / "spare.pt", tmp_path / "new.pt") is False
    assert os.listdir(tmp_path) == ["spare.pt"]


def _as_nobody(function) -> int:
    """``function()``'s int result, run in a forked child as uid/gid 65534 (no CAP_DAC_OVERRIDE)."""
    child = os.fork()
    if child == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os._exit(int(function()))
        except BaseException:  # noqa: BLE001  (a child must never return into pytest)
            os._exit(99)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("protect", ["nothing", "file", "directory"])
def test_take_for_overwrite_refuses_what_its_owner_made_read_only(posix, protect):
    """A spare whose file or directory its owner made read-only (chmod a-w) is not recycled, nor counted as room."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the check as an unprivileged uid (root may write read-only files)")
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="ds_fastckpt_spare_"))  # pytest's tmp dirs are private to root
    try:
        spare, pending = work / "spare", work / "pending"
        spare.mkdir()
        pending.mkdir()
        source = spare / "model.pt"
        source.write_bytes(b"old bytes" * 1000)
        for path in (work, spare, pending, source):
            os.chown(path, 65534, 65534)
        if protect == "file":
            os.chmod(source, 0o444)
        elif protect == "directory":
            os.chmod(spare, 0o555)
        expected = protect == "nothing"
        assert _as_nobody(lambda: posix.take_for_overwrite(source, pending / "model.pt")) == expected
        assert source.exists() != expected and (pending / "model.pt").exists() == expected
        if not expected:
            assert source.read_bytes() == b"old bytes" * 1000 and (source.stat().st_mode & 0o777) in (0o444, 0o644)
            assert _as_nobody(lambda: posix.reusable_bytes(source)) == 0
        assert _as_nobody(lambda: posix.cannot_remove(spare) is None) == (protect != "directory")
    finally:
        shutil.rmtree(work)
