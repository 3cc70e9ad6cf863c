"""After a save or a rotation: does this process still hold anything open where the engine saves?"""

import os
from pathlib import Path
from typing import Iterable, List

from ds_fastckpt.native.fd_accounting import OpenFd, open_fds


class FdLeakError(RuntimeError):
    """Descriptors still point into save_dir after a save or rotation; the message lists them."""


def describe(entries: List[OpenFd]) -> str:
    return ", ".join(f"fd {entry.fd} -> {entry.target}{' (deleted)' if entry.deleted else ''}" for entry in entries)


def leaked_fds(save_dir, removing: Iterable[Path] = (), expected: Iterable[str] = (),
               earlier_dirs: Iterable[str] = ()) -> List[OpenFd]:
    """Descriptors into ``save_dir``, and to deleted files under ``earlier_dirs``, that nobody should hold.

    Paths are compared resolved, as /proc/self/fd shows them, so a save_dir
    reached through a symlink is audited where it really is.

    Args:
        save_dir: the directory just saved into: any descriptor there counts.
        removing: retired directories our background writer is removing right now; the directory
            descriptors its ``shutil.rmtree`` holds there are not leaks.
        expected: resolved paths of files this process keeps open on purpose (save_dir locks); a
            descriptor to one of them whose file was deleted still counts.
        earlier_dirs: resolved paths of directories saved into before (a client may save each
            checkpoint into a new directory and delete old ones itself): a descriptor to a deleted
            file there holds disk space nobody can free.
    """
    root = [os.path.realpath(save_dir)]
    skipped = [os.path.realpath(path) for path in removing]
    earlier = list(earlier_dirs)
    kept_open = set(expected)
    found = []
    for entry in open_fds():
        if _under(entry.target, skipped) or (entry.target in kept_open and not entry.deleted):
            continue
        if _under(entry.target, root) or (entry.deleted and _under(entry.target, earlier)):
            found.append(entry)
    return found


def leak_message(save_dir, when: str, found: List[OpenFd]) -> str:
    return f"file descriptors still open into {save_dir} after {when}: {describe(found)}"


def _under(target: str, roots: List[str]) -> bool:
    return any(target == root or target.startswith(root.rstrip("/") + "/") for root in roots)
