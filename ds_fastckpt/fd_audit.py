"""After a save or a rotation: does this process still hold anything open in save_dir?"""

import logging
from typing import List

from .fd_accounting import OpenFd, open_fds_under

logger = logging.getLogger(__name__)


class FdLeakError(RuntimeError):
    """Descriptors still point into save_dir after a save or rotation; the message lists them."""


def describe(entries: List[OpenFd]) -> str:
    return ", ".join(f"fd {entry.fd} -> {entry.target}{' (deleted)' if entry.deleted else ''}" for entry in entries)


def audit_fds(save_dir, mode: str, when: str, ignore=()) -> List[OpenFd]:
    """Checks /proc/self/fd for descriptors into ``save_dir`` (deleted files there included).

    Args:
        save_dir: the checkpoint directory.
        mode: "raise", "warn" or "off".
        when: what just happened, for the message ("save of global_step10").
        ignore: descriptor numbers this process holds on purpose.

    Returns:
        The descriptors found (empty with mode "off").

    Raises:
        FdLeakError: with mode "raise" when any are found.
    """
    if mode == "off":
        return []
    found = [entry for entry in open_fds_under(save_dir) if entry.fd not in set(ignore)]
    if found:
        message = f"file descriptors still open into {save_dir} after {when}: {describe(found)}"
        if mode == "raise":
            raise FdLeakError(message)
        logger.warning(message)
    return found
