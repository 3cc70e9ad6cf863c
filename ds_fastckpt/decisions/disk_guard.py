"""Refuses to start a save that will not fit, after freeing what rotation would free anyway."""

import errno
from pathlib import Path
from typing import Callable, List

from ds_fastckpt import storage
from ds_fastckpt.format.records import CheckpointRecord, complete_checkpoints


class InsufficientSpaceError(OSError):
    """Not enough free space in save_dir for the next checkpoint (errno ENOSPC, filename save_dir)."""


def needed_bytes(records: List[CheckpointRecord]) -> int:
    """The size of the newest complete checkpoint: what the next one will most likely need."""
    complete = complete_checkpoints(records)
    return complete[-1].manifest.total_bytes if complete else 0


def ensure_space(save_dir: Path, records: List[CheckpointRecord], free_early: Callable[[], int]) -> None:
    """Makes sure ``save_dir`` has room for a checkpoint as large as the last one.

    Args:
        save_dir: the checkpoint directory.
        records: its current records.
        free_early: deletes what rotation allows before the new save and returns how many it deleted.

    Raises:
        InsufficientSpaceError: before anything is written, saying how much is needed and free.
    """
    needed = needed_bytes(records)
    backend = storage.storage_for(save_dir)
    if needed == 0 or backend.free_bytes(save_dir) >= needed:
        return
    free_early()
    free = backend.free_bytes(save_dir)
    if free < needed:
        raise InsufficientSpaceError(
            errno.ENOSPC, f"not enough space for the next checkpoint: the last one took {needed} bytes and only "
            f"{free} are free; nothing was written (free space or lower checkpoint.fast_aio.keep_last)", str(save_dir))
