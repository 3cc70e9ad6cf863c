"""Refuses to start a save that will not fit, after freeing what may go, least valuable first.

The order (``ensure_space``'s steps, from ``engine.pending``): a spare the
save will write over in place counts as room already (recycling reuses its
blocks, so nothing needs freeing); then leftovers no one needs (trash,
interrupted saves); then the spare; and only when none of that makes room,
the checkpoints rotation would delete after the commit anyway. A checkpoint
``keep_last`` keeps is therefore never freed while a leftover could have made
the room, and a save that then fails still leaves it.
"""

import errno
from pathlib import Path
from typing import Callable, List, Sequence

from ds_fastckpt import storage
from ds_fastckpt.format.records import CheckpointRecord, complete_checkpoints


class InsufficientSpaceError(OSError):
    """Not enough free space in save_dir for the next checkpoint (errno ENOSPC, filename save_dir)."""


def needed_bytes(records: List[CheckpointRecord]) -> int:
    """The size of the newest complete checkpoint: what the next one will most likely need."""
    complete = complete_checkpoints(records)
    return complete[-1].manifest.total_bytes if complete else 0


def reusable_bytes(save_dir: Path, records: List[CheckpointRecord]) -> int:
    """The bytes a save like the newest checkpoint would write over in the spares instead of allocating anew.

    Each file of the newest checkpoint's manifest counts what the spare's file
    of the same name holds, up to the new file's size, when it may be written
    over now (``Storage.reusable_bytes``: one link, writable, open nowhere).
    Looked at, nothing changed.
    """
    complete = complete_checkpoints(records)
    spares = [save_dir / record.name for record in records if record.leftover == "spare"]
    if not complete or not spares:
        return 0
    backend = storage.storage_for(save_dir)
    total = 0
    for file in complete[-1].manifest.files:
        total += max((min(file.bytes, backend.reusable_bytes(spare / file.path)) for spare in spares), default=0)
    return total


def ensure_space(save_dir: Path, records: List[CheckpointRecord], free_steps: Sequence[Callable[[], int]],
                 reusable: Callable[[], int] = lambda: 0) -> None:
    """Makes sure ``save_dir`` has room for a checkpoint as large as the last one.

    Args:
        save_dir: the checkpoint directory.
        records: its current records.
        free_steps: ways to free space, least valuable first; each deletes something and returns how many
            directories it deleted. They run in order until there is room, and no further.
        reusable: bytes the save will write over in place rather than allocate (``reusable_bytes``), asked
            again after each step (a step may have freed the spare).

    Raises:
        InsufficientSpaceError: before anything is written, saying how much is needed and free.
    """
    needed = needed_bytes(records)
    if needed == 0:
        return
    backend = storage.storage_for(save_dir)
    for free_more in [*free_steps, None]:
        free = backend.free_bytes(save_dir)
        # The spare's files are looked at (a lease on each) only when free space alone is short: most saves fit.
        if free >= needed or free + reusable() >= needed:
            return
        if free_more is None:
            break
        free_more()
    free = backend.free_bytes(save_dir)
    raise InsufficientSpaceError(
        errno.ENOSPC, f"not enough space for the next checkpoint: the last one took {needed} bytes and only "
        f"{free} are free; nothing was written (free space or lower checkpoint.fast_aio.keep_last)", str(save_dir))
