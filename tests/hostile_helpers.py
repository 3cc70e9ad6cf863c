"""Hostile files for the tests, and a way to run code that may hang or eat memory without hanging the suite.

``promptly(fn, *args)`` runs ``fn`` in a forked child with a memory cap and a
timeout: a regression that blocks on a FIFO or reads ``/dev/zero`` into
memory fails its test instead of hanging the suite or swapping the machine.
The child must not use torch.distributed or DeepSpeed engines (the parent may
have a process group); engine-level checks run in ``hostile_worker.py``.
"""

import contextlib
import io
import logging
import multiprocessing
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

SECRET = "TOP-SECRET-CONTENT-OF-ANOTHER-FILE"
_KEEP_CHARS = 20000


def make_fifo(path: Path) -> None:
    """Replaces ``path`` by a FIFO nobody writes to: reading it blocks forever."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def link_to_dev_zero(path: Path) -> None:
    """Replaces ``path`` by a symlink to /dev/zero: reading it never ends."""
    path.unlink(missing_ok=True)
    os.symlink("/dev/zero", path)


def link_to_secret(path: Path) -> Path:
    """Replaces ``path`` by a symlink to another file holding ``SECRET``; returns that file."""
    other = path.parent.parent / f"other_file_for_{path.name}"
    other.write_text(f"{SECRET}\nsecond line\n")
    path.unlink(missing_ok=True)
    os.symlink(other, path)
    return other


def huge(path: Path, size: int = 10 << 20) -> None:
    """Replaces ``path`` by a ``size``-byte regular file of printable text (10 MiB by default)."""
    path.unlink(missing_ok=True)
    path.write_bytes(b"global_step2" + b"x" * (size - 12))


def nested_json(depth: int = 100_000) -> bytes:
    """A JSON value nested ``depth`` deep; ``json.loads`` raises RecursionError on it."""
    return b"[" * depth + b"]" * depth


HOSTILE = {"fifo": make_fifo, "dev_zero": link_to_dev_zero}


@dataclass
class Outcome:
    """What a call in the child did: its value or its exception, and what it printed and logged."""

    value: object = None
    error_type: Optional[str] = None
    error: str = ""
    stdout: str = ""
    stderr: str = ""
    logs: List[str] = field(default_factory=list)
    output_chars: int = 0  # the error, stdout, stderr and log messages, in full
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return "\n".join([self.error, self.stdout, self.stderr, *self.logs])


def promptly(function, *args, timeout: float = 60.0, memory_bytes: int = 1 << 30) -> Outcome:
    """``function(*args)`` in a forked child, which may grow by ``memory_bytes`` at most.

    Raises:
        AssertionError: the child did not finish within ``timeout`` seconds (it is killed) or died.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, function, args, memory_bytes), daemon=True)
    start = time.monotonic()
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise AssertionError(f"{getattr(function, '__name__', function)}{args} did not return within "
                                 f"{timeout} s")
        outcome = receiver.recv()
    except EOFError:
        raise AssertionError(f"{getattr(function, '__name__', function)}{args} died") from None
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()
    outcome.seconds = time.monotonic() - start
    return outcome


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _child(sender, function, args, memory_bytes):
    with open("/proc/self/statm") as statm:
        used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + memory_bytes, resource.RLIM_INFINITY))
    collect = _Collect()
    ds_logger = logging.getLogger("ds_fastckpt")
    ds_logger.addHandler(collect)
    ds_logger.setLevel(logging.INFO)
    out, err, outcome = io.StringIO(), io.StringIO(), Outcome()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            outcome.value = function(*args)
        except BaseException as error:  # reported to the parent, which asserts on it
            outcome.error_type, outcome.error = type(error).__name__, str(error)
    stdout, stderr = out.getvalue(), err.getvalue()
    outcome.output_chars = (len(outcome.error) + len(stdout) + len(stderr)
                            + sum(len(message) for message in collect.messages))
    outcome.stdout, outcome.stderr = stdout[:_KEEP_CHARS], stderr[:_KEEP_CHARS]
    outcome.logs = [message[:_KEEP_CHARS] for message in collect.messages]
    outcome.error = outcome.error[:_KEEP_CHARS]
    try:
        sender.send(outcome)
    finally:
        os._exit(0)
