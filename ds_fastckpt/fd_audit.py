"""After a save or a rotation: does this process still hold anything open in save_dir?"""

import logging
from pathlib import Path
from typing import Iterable, List

from .fd_accounting import OpenFd, open_fds_under

logger = logging.getLogger(__name__)


class FdLeakError(RuntimeError):
    """Descriptors still point into save_dir after a save or rotation; the message lists them."""


def describe(entries: List[OpenFd]) -> str:
    return ", ".join(f"fd {entry.fd} -> {entry.target}{' (deleted)' if entry.deleted else ''}" for entry in entries)


def audit_fds(save_dir, mode: str, when: str, removing: Iterable[Path] = (),
              expected: Iterable[Path] = ()) -> List[OpenFd]:
    """Checks /proc/self/fd for descriptors into ``save_dir`` (deleted files there included).

    Args:
        save_dir: the checkpoint directory.
        mode: "raise", "warn" or "off".
        when: what just happened, for the message ("save of global_step10").
        removing: retired directories our background writer is removing right now; the directory
            descriptors its ``shutil.rmtree`` holds there are not leaks.
        expected: files this process keeps open on purpose (the save_dir lock).

    Returns:
        The descriptors found (empty with mode "off").

    Raises:
        FdLeakError: with mode "raise" when any are found.
    """
    if mode == "off":
        return []
    skipped = [str(path) for path in removing]
    kept_open = {str(path) for path in expected}
    found = [
        entry for entry in open_fds_under(save_dir) if entry.target not in kept_open
        and not any(entry.target == root or entry.target.startswith(root + "/") for root in skipped)
    ]
    if found:
        message = f"file descriptors still open into {save_dir} after {when}: {describe(found)}"
        if mode == "raise":
            raise FdLeakError(message)
        logger.warning(message)
    return found
