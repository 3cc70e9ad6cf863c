"""What this process holds open: /proc/self/fd entries, and the native op's own counts.

The fd leak this project was born from (DeepSpeed's FastFileWriter before
0.19.1) was invisible to Python attributes; only the OS knew. These helpers ask
the OS.
"""

import os
from dataclasses import dataclass
from typing import List

_PROC_FD = "/proc/self/fd"


@dataclass(frozen=True)
class OpenFd:
    """One descriptor of this process: its number, what it points at, and whether that file was unlinked."""

    fd: int
    target: str
    deleted: bool


@dataclass(frozen=True)
class OpFdCounters:
    """Descriptors the native op opened and closed since the process started."""

    opened: int
    closed: int

    @property
    def open_now(self) -> int:
        return self.opened - self.closed


def open_fds() -> List[OpenFd]:
    """All descriptors of this process that point at files or directories (not pipes or sockets)."""
    found = []
    for name in os.listdir(_PROC_FD):
        link = os.path.join(_PROC_FD, name)
        try:
            target = os.readlink(link)
            # stat() through the magic link reaches the open inode itself:
            # st_nlink == 0 means it was unlinked, whatever its name says.
            deleted = os.stat(link).st_nlink == 0
        except FileNotFoundError:
            continue  # closed since listdir(), e.g. the fd listdir() itself used
        if not target.startswith("/"):
            continue
        if deleted and target.endswith(" (deleted)"):
            target = target[:-len(" (deleted)")]
        found.append(OpenFd(int(name), target, deleted))
    return found


def open_fds_under(directory) -> List[OpenFd]:
    """Descriptors pointing at ``directory`` or anything below it, deleted files included."""
    root = os.path.realpath(directory)
    prefix = root.rstrip("/") + "/"
    return [entry for entry in open_fds() if entry.target == root or entry.target.startswith(prefix)]


def deleted_fds_under(directory) -> List[OpenFd]:
    """Descriptors pointing at files under ``directory`` that have been unlinked: disk space nobody can free."""
    return [entry for entry in open_fds_under(directory) if entry.deleted]


def op_fd_counters() -> OpFdCounters:
    """The native op's own count of descriptors it opened and closed."""
    from ds_fastckpt.native.op import load_op

    counts = load_op().fd_counters()
    return OpFdCounters(opened=counts["opened"], closed=counts["closed"])
