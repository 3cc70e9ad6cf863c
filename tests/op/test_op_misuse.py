"""The native op misused from Python raises a Python exception and leaves the file and descriptors clean.

Every misuse runs in a child interpreter started with ``-X faulthandler``, so a crash (the op releases the
GIL, and used to have no lock) fails the test with the child's traceback instead of killing pytest. The child
prints one JSON line of what it observed; the tests assert on that.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ds_fastckpt.native.op import load_op

REPO = Path(__file__).resolve().parents[2]

# Shared by every child. A hang (a reader waiting for reads never queued) is dumped and fails after 120 s.
PRELUDE = '''
import faulthandler, json, os, sys, threading
faulthandler.dump_traceback_later(120, exit=True)
import torch
from ds_fastckpt import open_fds_under, op_fd_counters
from ds_fastckpt.native.op import load_op

op = load_op()
DIR = sys.argv[1]
BLOCK = 4096
# 16 MiB through 4 KiB halves with one request in flight: one write() call of this (4096 round trips to the
# disk, about 0.7 s here) is long enough for the main thread to act while it is inside the op.
PAYLOAD = os.urandom(16 << 20)
started = op_fd_counters()


def path(name):
    return os.path.join(DIR, name)


def outcome(call):
    """'ok', or the exception's type and message: the child never dies of a Python exception."""
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


def staging():
    return torch.empty(3 * BLOCK, dtype=torch.uint8)  # two 4 KiB halves, aligned somewhere inside


def in_background(call):
    result = {}
    thread = threading.Thread(target=lambda: result.update(outcome=outcome(call)))
    thread.start()
    return thread, result


def inside_the_op(writer, thread):
    """True once a property read is refused because `thread` is inside a call of `writer`."""
    while thread.is_alive():
        try:
            writer.bytes_written
        except RuntimeError:
            return True
    return False


def finish(**observed):
    observed["fds_into_dir"] = [entry.target for entry in open_fds_under(DIR)]
    observed["op_fds_left_open"] = op_fd_counters().open_now - started.open_now
    print(json.dumps(observed))
'''


@pytest.fixture(scope="module", autouse=True)
def built_op():
    """Builds the op once here, so no child builds it under its own timeout."""
    load_op()


def run_child(directory: Path, body: str) -> dict:
    code = PRELUDE + textwrap.dedent(body)
    child = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, str(directory)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"the child exited with {child.returncode}:\n{child.stderr[-6000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])


def assert_clean(observed: dict) -> None:
    assert observed["fds_into_dir"] == []
    assert observed["op_fds_left_open"] == 0


def test_second_thread_writing_the_raw_writer_is_refused(tmp_path):
    observed = run_child(tmp_path, '''
        for attempt in range(5):  # retried only if the first write finished before the second call was made
            writer = op.AioWriter(path(f"two_writers{attempt}.bin"), staging(), BLOCK, BLOCK, 1, True)
            first, result = in_background(lambda: writer.write(PAYLOAD))
            busy = inside_the_op(writer, first)
            second = outcome(lambda: writer.write(b"y" * 100))
            early_close = outcome(writer.close)
            first.join()
            if busy and second != "ok":
                break
            writer.abort()
        closed = outcome(writer.close)
        with open(path(f"two_writers{attempt}.bin"), "rb") as file:
            on_disk = file.read()
        finish(first=result["outcome"], second=second, early_close=early_close, closed=closed,
               intact=on_disk == PAYLOAD, checksum_matches=writer.checksum == op.crc32c(PAYLOAD))
    ''')
    assert observed["second"].startswith("RuntimeError: AioWriter.write() was called while AioWriter.write() is "
                                         "running on another thread")
    assert observed["early_close"].startswith("RuntimeError: AioWriter.close() was called while AioWriter.write()")
    assert observed["first"] == "ok" and observed["closed"] == "ok"
    assert observed["intact"] and observed["checksum_matches"]
    assert_clean(observed)


def test_abort_waits_for_a_running_write(tmp_path):
    observed = run_child(tmp_path, '''
        for attempt in range(5):
            writer = op.AioWriter(path(f"abort{attempt}.bin"), staging(), BLOCK, BLOCK, 1, True)
            first, result = in_background(lambda: writer.write(PAYLOAD))
            busy = inside_the_op(writer, first)
            aborted = outcome(writer.abort)  # returns once the write has: the write still succeeds
            first.join()
            if busy:
                break
        finish(first=result["outcome"], aborted=aborted, is_open=writer.is_open,
               write_after=outcome(lambda: writer.write(b"z")),
               close_after=outcome(writer.close))
    ''')
    assert observed["aborted"] == "ok" and observed["first"] == "ok"
    assert observed["is_open"] is False
    assert observed["write_after"].startswith("OSError: [Errno 9]") and "writer is closed" in observed["write_after"]
    assert observed["close_after"].startswith("OSError: [Errno 9]")
    assert_clean(observed)


def test_file_writer_used_from_two_threads_refuses_and_keeps_its_staging(tmp_path):
    observed = run_child(tmp_path, '''
        from ds_fastckpt import AioFileWriter, StagingBuffer

        buffer = StagingBuffer(BLOCK)
        for attempt in range(5):
            name = path(f"file_writer{attempt}.bin")
            writer = AioFileWriter(name, staging=buffer, block_size=BLOCK, queue_depth=1)
            first, result = in_background(lambda: writer.write(PAYLOAD))
            busy = inside_the_op(writer, first)
            second = outcome(lambda: writer.write(b"y" * 100))
            early_close = outcome(writer.close)
            still_open = not writer.closed
            staging_free = outcome(buffer.acquire)  # must still belong to the writer
            if staging_free == "ok":
                buffer.release()
            first.join()
            if busy and second != "ok":
                break
            writer.close()
        closed = outcome(writer.close)
        with open(name, "rb") as file:
            intact = file.read() == PAYLOAD
        with AioFileWriter(path("next.bin"), staging=buffer) as again:  # released by the close
            again.write(b"next")
        finish(first=result["outcome"], second=second, early_close=early_close, still_open=still_open,
               staging_free=staging_free, closed=closed, intact=intact)
    ''')
    assert observed["second"].startswith("RuntimeError: AioFileWriter.write() on ")
    assert "while write() is running on another thread" in observed["second"]
    assert observed["early_close"].startswith("RuntimeError: AioFileWriter.close() on ")
    assert observed["still_open"] and observed["staging_free"].startswith("RuntimeError: this StagingBuffer")
    assert observed["first"] == "ok" and observed["closed"] == "ok" and observed["intact"]
    assert_clean(observed)


def test_overflowing_sizes_are_refused_before_any_memory_is_touched(tmp_path):
    observed = run_child(tmp_path, '''
        results = {}
        for half in (2**63, 2**64 - BLOCK, 2**62, 2**64, -1):
            results[f"half_bytes={half}"] = outcome(
                lambda: op.AioWriter(path("half.bin"), staging(), half, BLOCK, 2, True))
        for size in (2**63, 2**64 - BLOCK, 16 * BLOCK):
            results[f"write_aligned size={size}"] = outcome(
                lambda: op.write_aligned(path("aligned.bin"), staging(), size, BLOCK, 2, True))
        for depth in (2**31, 65537, 2**32):
            results[f"writer queue_depth={depth}"] = outcome(
                lambda: op.AioWriter(path("depth.bin"), staging(), BLOCK, BLOCK, depth, True))
        results["float staging"] = outcome(
            lambda: op.AioWriter(path("f.bin"), torch.empty(8192), BLOCK, BLOCK, 2, True))
        finish(results=results, half_file_created=os.path.exists(path("half.bin")),
               aligned_file_created=os.path.exists(path("aligned.bin")))
    ''')
    results = observed["results"]
    for half in (2**63, 2**64 - 4096):
        assert results[f"half_bytes={half}"] == (f"ValueError: half_bytes={half} is not allowed: two halves of it "
                                                 "overflow the address space")
    assert results[f"half_bytes={2**62}"].startswith("ValueError: staging buffer holds 12288 bytes")
    assert results[f"half_bytes={2**62}"].endswith(f"{2**63} aligned bytes are needed")
    assert results[f"half_bytes={2**64}"].startswith("TypeError")  # does not fit size_t
    assert results["half_bytes=-1"].startswith("TypeError")
    for size in (2**63, 2**64 - 4096, 16 * 4096):
        assert results[f"write_aligned size={size}"].startswith("ValueError: buffer holds 12288 bytes")
    for depth in (2**31, 65537):
        assert results[f"writer queue_depth={depth}"].startswith("OSError: [Errno 22]")
        assert "queue_depth must be 1 to 65536" in results[f"writer queue_depth={depth}"]
    assert results[f"writer queue_depth={2**32}"].startswith("TypeError")
    assert results["float staging"] == "ValueError: staging buffer must be a contiguous uint8 CPU tensor"
    assert not observed["half_file_created"] and not observed["aligned_file_created"]
    assert_clean(observed)


def test_block_size_near_size_max_writes_and_reads_exact_bytes(tmp_path):
    observed = run_child(tmp_path, '''
        huge = 2**64 - BLOCK  # a multiple of 4096; block offsets used to wrap around with it
        data = PAYLOAD[:5 * BLOCK + 123]
        writer = op.AioWriter(path("huge_block.bin"), staging(), BLOCK, huge, 2, True)
        writer.write(data)
        writer.close()
        with open(path("huge_block.bin"), "rb") as file:
            written = file.read() == data
        buffer = torch.empty(len(data) + 2 * BLOCK, dtype=torch.uint8)
        reader = op.FileReader(path("huge_block.bin"), buffer, huge, 2)
        reader.wait(0, reader.size)
        reader.finish()
        start = -buffer.data_ptr() % BLOCK
        read = bytes(buffer.numpy()[start:start + reader.size]) == data
        finish(written=written, read=read)
    ''')
    assert observed["written"] and observed["read"]
    assert_clean(observed)


def test_reader_misuse_raises_and_finish_waits_for_waiting_threads(tmp_path):
    observed = run_child(tmp_path, '''
        with open(path("data.bin"), "wb") as file:
            file.write(PAYLOAD)
        results = {}
        buffer = torch.empty(len(PAYLOAD) + BLOCK, dtype=torch.uint8)
        reader = op.FileReader(path("data.bin"), buffer, BLOCK, 1)  # 4096 reads, one at a time
        waiters = [in_background(lambda: reader.wait(0, len(PAYLOAD))) for _ in range(3)]
        results["finish"] = outcome(reader.finish)  # waits for the waiting threads, then closes
        for thread, _ in waiters:
            thread.join()
        results["waits"] = [result["outcome"] for _, result in waiters]
        results["wait_after_finish"] = outcome(lambda: reader.wait(0, 1))
        results["finish_again"] = outcome(reader.finish)
        start = -buffer.data_ptr() % BLOCK
        intact = bytes(buffer.numpy()[start:start + len(PAYLOAD)]) == PAYLOAD

        small = torch.empty(BLOCK, dtype=torch.uint8)
        results["small buffer"] = outcome(lambda: op.FileReader(path("data.bin"), small, BLOCK, 2))
        results["queue_depth=2**31"] = outcome(lambda: op.FileReader(path("data.bin"), buffer, BLOCK, 2**31))
        results["float buffer"] = outcome(lambda: op.FileReader(path("data.bin"), torch.empty(8), BLOCK, 2))
        finish(results=results, intact=intact)
    ''')
    results = observed["results"]
    assert results["finish"] == "ok" and results["waits"] == ["ok"] * 3 and observed["intact"]
    assert results["wait_after_finish"].startswith("OSError: [Errno 9]") and "reader is finished" in \
        results["wait_after_finish"]
    assert results["finish_again"] == "ok"
    assert results["small buffer"].startswith("OSError: [Errno 75]")  # EOVERFLOW: the file does not fit
    assert results["queue_depth=2**31"].startswith("OSError: [Errno 22]")
    assert results["float buffer"] == "ValueError: buffer must be a contiguous uint8 CPU tensor"
    assert_clean(observed)


def test_objects_never_initialized_raise_type_error(tmp_path):
    observed = run_child(tmp_path, '''
        results = {}
        bare_writer = op.AioWriter.__new__(op.AioWriter)
        for name, call in {"write": lambda: bare_writer.write(b"x"), "close": bare_writer.close,
                           "abort": bare_writer.abort, "bytes_written": lambda: bare_writer.bytes_written,
                           "is_open": lambda: bare_writer.is_open}.items():
            results[f"AioWriter.{name}"] = outcome(call)
        bare_reader = op.FileReader.__new__(op.FileReader)
        for name, call in {"wait": lambda: bare_reader.wait(0, 1), "finish": bare_reader.finish,
                           "size": lambda: bare_reader.size}.items():
            results[f"FileReader.{name}"] = outcome(call)
        results["unbound call on another type"] = outcome(lambda: op.AioWriter.close(bare_reader))
        writer = op.AioWriter(path("twice.bin"), staging(), BLOCK, BLOCK, 2, True)
        results["second __init__"] = outcome(
            lambda: writer.__init__(path("other.bin"), staging(), BLOCK, BLOCK, 2, True))
        writer.write(b"kept")
        writer.close()
        with open(path("twice.bin"), "rb") as file:
            kept = file.read() == b"kept"
        finish(results=results, kept=kept, other_created=os.path.exists(path("other.bin")))
    ''')
    results = observed["results"]
    for name in ("write", "close", "abort", "bytes_written", "is_open"):
        assert results[f"AioWriter.{name}"] == ("TypeError: AioWriter object was never initialized: create it with "
                                                "AioWriter(...), not with __new__")
    for name in ("wait", "finish", "size"):
        assert results[f"FileReader.{name}"].startswith("TypeError: FileReader object was never initialized")
    assert results["unbound call on another type"].startswith("TypeError")
    # pybind11 ignores a second __init__: the writer keeps its file, no second one is opened
    assert results["second __init__"] == "ok" and observed["kept"] and not observed["other_created"]
    assert_clean(observed)
