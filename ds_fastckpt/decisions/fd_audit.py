"""After a save or a rotation: does this process still hold a checkpoint file open where the engine saves?

Only checkpoint files count: a job's own files in save_dir (a log, a metrics
CSV, a TensorBoard event file) are the job's business and never a leak.
"""

import os
from pathlib import Path
from typing import Iterable, List, Optional

from ds_fastckpt.format.names import LATEST_NAME, LOCK_NAME, MANIFEST_NAME, tag_of_internal_name
from ds_fastckpt.native.fd_accounting import OpenFd, open_fds


class FdLeakError(RuntimeError):
    """Descriptors still point into save_dir after a save or rotation; the message lists them."""


def describe(entries: List[OpenFd]) -> str:
    return ", ".join(f"fd {entry.fd} -> {entry.target}{' (deleted)' if entry.deleted else ''}" for entry in entries)


def leaked_fds(save_dir, removing: Iterable[Path] = (), expected: Iterable[str] = (),
               earlier_dirs: Iterable[str] = (), checkpoint_dirs: Iterable[str] = ()) -> List[OpenFd]:
    """Descriptors to checkpoint files in ``save_dir``, and to deleted ones under ``earlier_dirs``.

    A checkpoint file is anything inside a checkpoint directory (one that
    holds our manifest, or one in ``checkpoint_dirs``), inside a pending,
    spare or trash directory, or ``latest`` and the save_dir lock. Paths are
    compared resolved, as /proc/self/fd shows them, so a save_dir reached
    through a symlink is audited where it really is.

    Args:
        save_dir: the directory just saved into: any descriptor there counts.
        removing: retired directories our background writer is removing right now; the directory
            descriptors its ``shutil.rmtree`` holds there are not leaks.
        expected: resolved paths of files this process keeps open on purpose (save_dir locks); a
            descriptor to one of them whose file was deleted still counts.
        earlier_dirs: resolved paths of directories saved into before (a client may save each
            checkpoint into a new directory and delete old ones itself): a descriptor to a deleted
            checkpoint file there holds disk space nobody can free.
        checkpoint_dirs: resolved paths of the checkpoint directories this process committed; they
            count as checkpoints even once deleted (their manifest is gone with them).
    """
    root = [os.path.realpath(save_dir)]
    skipped = [os.path.realpath(path) for path in removing]
    earlier = list(earlier_dirs)
    kept_open = set(expected)
    ours = set(checkpoint_dirs)
    found = []
    for entry in open_fds():
        if _under(entry.target, skipped) or (entry.target in kept_open and not entry.deleted):
            continue
        holder = _holder(entry.target, root + earlier if entry.deleted else root)
        if holder is not None and _is_checkpoint_file(entry.target, holder, ours):
            found.append(entry)
    return found


def leak_message(save_dir, when: str, found: List[OpenFd]) -> str:
    return f"file descriptors still open into {save_dir} after {when}: {describe(found)}"


def _under(target: str, roots: List[str]) -> bool:
    return any(target == root or target.startswith(root.rstrip("/") + "/") for root in roots)


def _holder(target: str, roots: List[str]) -> Optional[str]:
    """The root ``target`` lies strictly below, or None."""
    return next((root for root in roots if target.startswith(root.rstrip("/") + "/")), None)


def _is_checkpoint_file(target: str, save_dir: str, ours: set) -> bool:
    """Whether ``target``, below ``save_dir``, is one of the entries the engine writes there (``names``)."""
    entry = target[len(save_dir.rstrip("/")) + 1:].split("/", 1)[0]
    if entry in (LATEST_NAME, LOCK_NAME) or tag_of_internal_name(entry) is not None:
        return True
    top = os.path.join(save_dir, entry)
    return top in ours or os.path.lexists(os.path.join(top, MANIFEST_NAME))
