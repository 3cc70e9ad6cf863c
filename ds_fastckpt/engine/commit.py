"""One checkpoint save in progress, and its commit on the storage leader: manifest, rename, ``latest``.

The order is what makes a commit atomic and durable (each step names its
crash point in ``faults.save_points``):

1. the pending marker goes and every pending directory is fsynced: all files
   are on disk before anything claims they are complete;
2. the manifest is written atomically into the pending directory
   (``before_commit_record``);
3. the pending directory is renamed to ``<tag>``, or exchanged with an
   existing ``<tag>`` (``before_publish``), and save_dir is fsynced;
4. ``latest`` is replaced atomically (``before_latest``); if that fails, the
   rename and ``latest`` are undone before the error is raised, so a commit
   that raised is never what resumes.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import deepspeed

from ds_fastckpt import storage
from ds_fastckpt._version import __version__
from ds_fastckpt.decisions.deleter import delete_checkpoint
from ds_fastckpt.engine import collectives
from ds_fastckpt.faults import save_points
from ds_fastckpt.format.atomicity import atomic_write_bytes, publish_dir, undo_publish
from ds_fastckpt.format.manifest import FileRecord, Manifest, write_manifest
from ds_fastckpt.format.names import LATEST_NAME, PENDING_MARKER_NAME
from ds_fastckpt.format.records import CheckpointRecord, newest_sequence, scan, spare_dirs
from ds_fastckpt.format.small_files import UnsafeSmallFileError, read_small_file

logger = logging.getLogger(__name__)


@dataclass
class SaveInProgress:
    """A checkpoint between ``create`` and ``commit``: where it goes, where it is written meanwhile, what is done."""

    save_dir: Path
    tag: str
    pending: Path
    step: Optional[int]
    save_latest: bool
    files: List[FileRecord] = field(default_factory=list)
    pending_writes: list = field(default_factory=list)  # Futures of FileRecord or None, async mode only
    failed: Optional[BaseException] = None  # this rank's first error in this save: it is never committed
    snapshot_bytes: int = 0  # host memory this save's snapshots took, for snapshot_max_bytes
    spares: Optional[List[Path]] = None  # the spare directories this rank recycles files from, once looked up
    replicated: Optional[Path] = None  # the model-states file this rank's writer group writes together

    @property
    def final(self) -> Path:
        return self.save_dir / self.tag

    def redirect(self, path) -> Optional[Path]:
        """Where a path inside ``save_dir/tag`` is written while the save is pending, or None."""
        try:
            relative = Path(path).absolute().relative_to(self.final)
        except ValueError:
            return None
        return self.pending / relative

    def take_spare_file(self, path: Path) -> bool:
        """Moves the file of the same name from a spare checkpoint to ``path`` when it may be written over there."""
        if not path.is_relative_to(self.pending):
            return False
        if self.spares is None:
            self.spares = spare_dirs(self.save_dir)
        relative = path.relative_to(self.pending)
        backend = storage.storage_for(path)
        return any(backend.take_for_overwrite(spare / relative, path) for spare in self.spares)


    def make_shared_file(self, path: Path, size: int, recycle: bool) -> None:
        """Makes ``path`` ``size`` bytes long for its writer group to fill: the spare's file of the same name
        when ``recycle`` allows and nothing else holds it, else a new sparse file."""
        keep_blocks = recycle and self.take_spare_file(path)
        storage.storage_for(path).make_sized_file(path, size, keep_blocks=keep_blocks)


def publish(save: SaveInProgress, files: List[FileRecord], *, fsync: bool,
            changed: Callable[[Path], None]) -> Optional[Path]:
    """Commits ``save`` with ``files`` (every rank's records); run on the storage leader only.

    Args:
        save: the save to commit; its pending directory holds every file.
        files: the records of every file, from all ranks.
        fsync: make each step durable before the next.
        changed: called with the tag directory whenever what it holds changed (published or put back),
            so that cached manifests of it are dropped.

    Returns:
        The previous copy of the tag, now at the pending name, when the tag was saved again; else None.

    Raises:
        OSError: from any step, with errno and path; nothing visible has changed then.
    """
    manifest = Manifest(tag=save.tag, step=save.step, sequence=newest_sequence(scan(save.save_dir)) + 1,
                        committed_unix_ns=time.time_ns(), world_size=collectives.world_size(),
                        deepspeed_version=deepspeed.__version__, ds_fastckpt_version=__version__,
                        files=sorted(files, key=lambda record: record.path))
    return publish_manifest(save, manifest, fsync=fsync, changed=changed)


def publish_manifest(save: SaveInProgress, manifest: Manifest, *, fsync: bool,
                     changed: Callable[[Path], None]) -> Optional[Path]:
    """Commits ``save`` with ``manifest`` as it is (``publish`` makes one; a restore brings the remote one)."""
    storage.storage_for(save.pending).remove_file(save.pending / PENDING_MARKER_NAME)
    if fsync:
        _sync_tree(save.pending)
    save_points.reached("before_commit_record")
    write_manifest(save.pending, manifest, fsync=fsync)
    save_points.reached("before_publish")
    previous_latest = _read_if_exists(save.save_dir / LATEST_NAME) if save.save_latest else None
    replaced = publish_dir(save.pending, save.final, fsync=fsync)
    changed(save.final)
    save_points.reached("before_latest")
    if save.save_latest:
        _write_latest(save, replaced is not None, previous_latest, fsync=fsync, changed=changed)
    return replaced


def publish_and_rotate(save: SaveInProgress, files: List[FileRecord], *, fsync: bool,
                       changed: Callable[[Path], None], rotate: Callable[[], object]) -> None:
    """``publish``, then frees space: the tag's previous copy, if saved again, and what ``rotate`` retires.

    Once published the checkpoint is committed: a failure while freeing space is logged, and the next save retries.
    """
    replaced = publish(save, files, fsync=fsync, changed=changed)
    try:
        if replaced is not None:
            delete_checkpoint(save.save_dir, CheckpointRecord(name=replaced.name, tag=save.tag, leftover="pending"))
        rotate()
    except OSError as error:
        logger.error("checkpoint %r is committed, but removing old checkpoints failed (the next save retries): "
                     "%s", save.tag, error)


def _write_latest(save: SaveInProgress, exchanged: bool, previous: Optional[bytes], *, fsync: bool,
                  changed: Callable[[Path], None]) -> None:
    """Points ``latest`` at the new tag; if that fails, undoes the publication and ``latest``, and raises."""
    latest = save.save_dir / LATEST_NAME
    try:
        atomic_write_bytes(latest, save.tag.encode(), fsync=fsync)
    except OSError:
        undo_publish(save.pending, save.final, exchanged=exchanged)
        changed(save.final)
        try:
            if previous is None:
                storage.storage_for(latest).remove_file(latest, missing_ok=True)
            else:
                atomic_write_bytes(latest, previous, fsync=False)
        except OSError as error:
            logger.error("could not restore %s after the commit of %r failed: %s", latest, save.tag, error)
        raise


def _sync_tree(root: Path) -> None:
    """Makes the entries of ``root`` and of every directory below it durable: the files a save wrote."""
    backend = storage.storage_for(root)
    backend.sync_dir(root)
    for name in backend.subdirectories(root):
        _sync_tree(root / name)


def _read_if_exists(path: Path) -> Optional[bytes]:
    """``path``'s content, to restore if the commit fails; None when there is nothing worth restoring."""
    try:
        return read_small_file(path)
    except (FileNotFoundError, UnsafeSmallFileError):
        return None  # a FIFO, link, device or oversized file under our name: the commit replaces it anyway
