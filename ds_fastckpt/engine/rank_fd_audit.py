"""The fd audit after a save, on every rank, with one answer for all of them."""

import logging
import os
from pathlib import Path
from typing import Iterable, Set

from ds_fastckpt.decisions.fd_audit import FdLeakError, leak_message, leaked_fds
from ds_fastckpt.engine import collectives
from ds_fastckpt.engine.rank_group import RankGroup
from ds_fastckpt.format import save_dir_lock

logger = logging.getLogger(__name__)


def audit_fds(save_dir: Path, tag: str, mode: str, ranks: RankGroup, removing: Iterable[Path],
              saved_dirs: Set[str], checkpoint_dirs: Set[str]) -> None:
    """Every rank lists its descriptors to checkpoint files in ``save_dir``, and to deleted ones wherever it
    saved before (``fd_audit.leaked_fds``).

    The ranks share what they found, so a leak on one rank fails the save's
    return on every rank (the checkpoint stays committed) instead of
    leaving the others waiting for it in DeepSpeed's next collective.

    Args:
        save_dir: where the save went; added to ``saved_dirs``.
        tag: the checkpoint saved, for the messages.
        mode: ``fd_audit``: "raise", "warn" or "off".
        ranks: the engine's collectives.
        removing: what rotation is still removing in the background (descriptors to it are expected).
        saved_dirs: every save_dir this engine saved into, resolved; kept across saves.
        checkpoint_dirs: every checkpoint directory this engine committed, resolved; ``tag``'s is added.

    Raises:
        FdLeakError: with ``mode`` "raise", naming every rank's leaks.
    """
    saved_dirs.add(os.path.realpath(save_dir))
    checkpoint_dirs.add(os.path.realpath(save_dir / tag))
    if mode == "off":
        return
    found = leaked_fds(save_dir, removing=removing, expected=save_dir_lock.held_lock_files(),
                       earlier_dirs=saved_dirs, checkpoint_dirs=checkpoint_dirs)
    when = f"the save of {tag!r} and its rotation"
    mine = f"rank {collectives.rank()}: {leak_message(save_dir, when, found)}" if found else None
    reports = [report for report in ranks.gather(mine, f"the fd audit of {tag!r}") if report]
    if not reports:
        return
    if mode == "raise":
        raise FdLeakError("; ".join(reports))
    if mine is not None:
        logger.warning(mine)
