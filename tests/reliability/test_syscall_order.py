"""A synchronous save reaches the filesystem in crash-safe order, as strace sees it.

A checkpoint survives a power cut only if each step is durable before the next one makes it visible:
the data files are fsynced, then the manifest (the commit record) is renamed into the pending
directory, then the pending directory is renamed to ``save_dir/<tag>``, then ``save_dir`` is fsynced,
and only then does ``latest`` point at the new tag. Python-level mocks cannot show what the native op
and the kernel really do, so the save runs in a child process under ``strace -f -y``.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

from ds_fastckpt.format.names import LATEST_NAME, MANIFEST_NAME, pending_path

REPO = Path(__file__).resolve().parents[2]

# Two saves, so the last one replaces an existing `latest`, as it does in any real run.
# `python -c` imports from its cwd, the repo root.
CHILD = """
import sys
from tests.ds_helpers import init_engine, single_process_env, train
single_process_env()
engine = init_engine(1, {"keep_last": 2}, width=32)
for _ in range(2):
    train(engine, 1)
    engine.save_checkpoint(sys.argv[1])
engine.destroy()
"""

# -f: the op may fsync from its own threads. -y: each fd is printed with its path.
# --seccomp-bpf: only the traced calls stop the child (without it the run takes minutes).
STRACE = ["strace", "-f", "-qq", "-y", "--seccomp-bpf", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2"]


@dataclass
class Call:
    """One successful syscall; ``start``/``end`` are the trace lines where it began and returned."""

    name: str
    args: str
    start: int
    end: int

    def fd_path(self) -> Optional[str]:
        """The path strace -y printed for an fsync's fd: ``fsync(26</a/b.pt>)``."""
        found = re.fullmatch(r"\d+<(.*)>", self.args)
        return found.group(1) if found else None

    def paths(self) -> List[str]:
        """The quoted path arguments of a rename call, as strace printed them (the engine passes absolute paths)."""
        return re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)

    def __str__(self):
        return f"line {self.start + 1}: {self.name}({self.args})"


def parse_trace(text: str) -> List[Call]:
    """The successful calls of an ``strace -f`` log, in the order they returned.

    Lines are ``[pid] name(args) = result``; while one thread is inside a call another thread's line can
    come between, so strace splits the call into ``name(args <unfinished ...>`` and later
    ``<... name resumed>rest``, both with the same pid. Those two halves are joined here.
    """
    calls, unfinished = [], {}
    for index, line in enumerate(text.splitlines()):
        found = re.match(r"(?:(\d+)\s+)?(.*)$", line)
        pid, body = found.group(1), found.group(2)
        if body.endswith("<unfinished ...>"):
            unfinished[pid] = (index, body[:-len("<unfinished ...>")].rstrip())
            continue
        start = index
        resumed = re.match(r"<\.\.\. \w+ resumed>(.*)$", body)
        if resumed:
            start, head = unfinished.pop(pid)
            body = head + resumed.group(1)
        call = re.match(r"(\w+)\((.*)\)\s+= (-?\d+)", body)
        if call and call.group(3) == "0":  # failed calls changed nothing on disk
            calls.append(Call(call.group(1), call.group(2), start, index))
    return calls


def last(calls: List[Call], what: str, matches) -> Call:
    found = [call for call in calls if matches(call)]
    assert found, f"the trace has no {what}"
    return found[-1]


def strace_usable(tmp_path: Path) -> Optional[str]:
    """Why strace cannot trace here (ptrace not permitted, too old for --seccomp-bpf), or None."""
    probe = subprocess.run([*STRACE, "-o", str(tmp_path / "probe.trace"), "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else probe.stderr.strip() or f"exit status {probe.returncode}"


def test_sync_save_makes_each_step_durable_before_the_next_publishes_it(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (make test installs it with apt-get when run as root)")
    reason = strace_usable(tmp_path)
    if reason is not None:
        pytest.skip(f"strace cannot trace a child here: {reason}")
    save_dir, trace = tmp_path / "ckpts", tmp_path / "save.trace"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    child = subprocess.run([*STRACE, "-o", str(trace), sys.executable, "-c", CHILD, str(save_dir)],
                           env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert child.returncode == 0, child.stderr.decode()[-3000:]

    tag = (save_dir / LATEST_NAME).read_text()
    final, pending = save_dir / tag, pending_path(save_dir, tag)
    data_files = sorted(path.relative_to(final) for path in final.rglob("*.pt"))
    assert data_files, f"the last checkpoint {final} has no .pt files"
    calls = parse_trace(trace.read_text())

    def renamed_to(destination: Path, source: Optional[Path] = None):
        return lambda call: (call.name.startswith("rename") and call.paths()[-1:] == [str(destination)]
                             and (source is None or call.paths()[0] == str(source)))

    def fsync_of(path: Path):
        return lambda call: call.name == "fsync" and call.fd_path() == str(path)

    commit_record = last(calls, f"rename to {pending / MANIFEST_NAME}", renamed_to(pending / MANIFEST_NAME))
    publish = last(calls, f"rename of {pending} to {final}", renamed_to(final, pending))
    latest = last(calls, f"rename to {save_dir / LATEST_NAME}", renamed_to(save_dir / LATEST_NAME))
    # The first fsync of save_dir after the publish: it must come before `latest` names the new tag.
    dir_fsyncs = [call for call in calls if fsync_of(save_dir)(call) and call.start > publish.end]
    assert dir_fsyncs, f"save_dir {save_dir} is never fsynced after {publish}"

    steps = [(f"fsync of data file {name}", last(calls, f"fsync of {pending / name}", fsync_of(pending / name)))
             for name in data_files]
    steps += [("rename of the commit record", commit_record), ("rename of the pending dir", publish),
              ("fsync of save_dir", dir_fsyncs[0]), ("rename of latest", latest)]
    excerpt = "\n".join(f"  {what}: {call}" for what, call in steps)
    for what, call in steps[:len(data_files)]:
        assert call.end < commit_record.start, f"{what} returned after the commit record was renamed:\n{excerpt}"
    for (earlier, first), (later, second) in zip(steps[len(data_files):], steps[len(data_files) + 1:]):
        assert first.end < second.start, f"{earlier} did not return before the {later} began:\n{excerpt}"
