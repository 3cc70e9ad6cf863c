"""Starting a checkpoint on the storage leader: the pending directory every rank then writes into."""

from pathlib import Path
from typing import Optional

from ds_fastckpt import storage
from ds_fastckpt.decisions.deleter import delete_checkpoint
from ds_fastckpt.decisions.disk_guard import ensure_space, reusable_bytes
from ds_fastckpt.decisions.rotation import Rotation
from ds_fastckpt.engine.commit import SaveInProgress
from ds_fastckpt.format import save_dir_lock
from ds_fastckpt.format.manifest import write_pending_marker
from ds_fastckpt.format.records import newest_sequence
from ds_fastckpt.format.tags import InvalidTagError


def prepare_pending(save: SaveInProgress, abandoned: Optional[Path], rotation: Rotation,
                    lock: save_dir_lock.OneLock, recycle: bool = False) -> None:
    """Locks save_dir, refuses a tag naming what is not ours, drops leftovers, checks space, makes pending.

    ``abandoned`` is the pending directory of this job's previous save, which failed: no rank
    writes there any more, and its partial files may hold the space the new save needs. ``recycle``
    (``recycle_retired``): the save writes over the spare's files, so the disk guard counts them as room.

    Raises:
        InvalidTagError: when ``save_dir/<tag>`` exists and is not a complete checkpoint of ours.
        SaveDirLockedError, InsufficientSpaceError, OSError: from the lock, the disk guard and the filesystem.
    """
    backend = storage.storage_for(save.save_dir)
    backend.make_dir(save.save_dir, parents=True, exist_ok=True)
    lock.hold(save.save_dir)
    records = rotation.scan(save.save_dir)
    final = save.save_dir / save.tag
    if backend.exists(final) and save.tag not in {record.name for record in records if record.complete}:
        raise InvalidTagError(f"checkpoint tag {save.tag!r} cannot be saved: {final} exists and is not a "
                              "complete ds_fastckpt checkpoint (a file, a link, or a directory this engine did "
                              "not write), and it is never replaced or deleted: choose another tag or move it")
    stale = [record for record in records if record.name in (save.pending.name, getattr(abandoned, "name", None))]
    for record in stale:
        delete_checkpoint(save.save_dir, record)
    records = [record for record in records if record not in stale]
    # Least valuable first (see disk_guard): the spare this save writes over counts as room; then leftovers,
    # then the spare, and only then the checkpoints rotation deletes after the commit anyway.
    ensure_space(save.save_dir, records,
                 [lambda: rotation.make_room(save.save_dir, leftovers=("trash", "pending")),
                  lambda: rotation.make_room(save.save_dir, leftovers=("spare",)),
                  lambda: rotation.make_room(save.save_dir)],
                 reusable=lambda: reusable_bytes(save.save_dir, rotation.scan(save.save_dir)) if recycle else 0)
    backend.make_dir(save.pending)
    # Not fsynced: if a crash loses the pending directory or its marker, no checkpoint is lost.
    write_pending_marker(save.pending, save.tag, newest_sequence(records), fsync=False)
