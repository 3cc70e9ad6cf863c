"""What is in a save_dir: our complete checkpoints and our leftovers, nothing else.

Only direct subdirectories that are real directories (never symlinks) are
looked at. A directory is ours when what it carries names it:

- ``<tag>`` holding our manifest whose tag is ``<tag>``: a complete
  checkpoint (or a damaged one, when the manifest cannot be read);
- ``.<tag>.ds_fastckpt-tmp`` / ``.<tag>.ds_fastckpt-trash`` /
  ``.<tag>.ds_fastckpt-spare``: the leftover of an interrupted save or
  deletion, or a retired checkpoint kept for recycling, unless a readable pending marker or
  manifest inside names another tag.

``cp -r ckpts/global_step2 ckpts/best_model`` (or a rename) carries
global_step2's manifest into ``best_model``: its tag does not match, so the
copy is "not ours": never deleted, never resumed from as a complete
checkpoint, never counted toward ``keep_last``. A copy of a whole save_dir
keeps every name matching its manifest, so it is a consistent save_dir of
its own. Directories without our manifest or names are not looked into.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ds_fastckpt import storage
from ds_fastckpt.format.manifest import Manifest, ManifestError, pending_marker_of, read_manifest
from ds_fastckpt.format.names import MANIFEST_NAME, SPARE_SUFFIX, TRASH_SUFFIX, tag_of_internal_name
from ds_fastckpt.format.small_files import excerpt


@dataclass(frozen=True)
class CheckpointRecord:
    """One directory in save_dir that is ours, or (``not_ours``) carries our files but is not.

    Attributes:
        name: the directory name.
        tag: the checkpoint tag it holds or was to hold (the directory name when ``not_ours``).
        manifest: set for a complete checkpoint.
        leftover: "pending" or "trash" for the directory of an interrupted save or deletion, "spare" for a
            retired checkpoint kept for the next save to write over; else None.
        after_sequence: for a pending leftover, the newest commit when it was started (None if unknown).
        damaged: the reason a manifest could not be read; such a directory is never deleted.
        not_ours: why a directory carrying our manifest or leftover name is not ours (a copy or a renamed
            checkpoint); such a directory is never deleted nor resumed from.
    """

    name: str
    tag: str
    manifest: Optional[Manifest] = None
    leftover: Optional[str] = None
    after_sequence: Optional[int] = None
    damaged: Optional[str] = None
    not_ours: Optional[str] = None

    @property
    def complete(self) -> bool:
        return self.manifest is not None


def scan(save_dir, include_not_ours: bool = False) -> List[CheckpointRecord]:
    """Our checkpoint directories in ``save_dir``, complete ones sorted by commit order first.

    Never raises for what a directory holds: a manifest or marker that
    cannot be read makes its record damaged (or an unknown leftover), never
    an exception, and no metadata file is read beyond its size limit.

    Args:
        save_dir: the directory to look in.
        include_not_ours: also return the directories that carry our manifest or leftover name but are not
            ours (``not_ours`` set), last; for listing them, never for acting on them.
    """
    save_dir = Path(save_dir)
    records = []
    for name in storage.storage_for(save_dir).subdirectories(save_dir):
        record = _record_for(save_dir, name)
        if record is not None and (include_not_ours or record.not_ours is None):
            records.append(record)
    return sorted(records, key=_order)


def spare_dirs(save_dir) -> List[Path]:
    """The spare directories in ``save_dir`` (retired checkpoints kept for recycling), by name alone."""
    save_dir = Path(save_dir)
    return [save_dir / name for name in storage.storage_for(save_dir).subdirectories(save_dir)
            if name.endswith(SPARE_SUFFIX) and tag_of_internal_name(name) is not None]


def complete_checkpoints(records: List[CheckpointRecord]) -> List[CheckpointRecord]:
    """Complete checkpoints, oldest commit first."""
    return sorted((record for record in records if record.complete), key=lambda record: record.manifest.sequence)


def newest_sequence(records: List[CheckpointRecord]) -> int:
    complete = complete_checkpoints(records)
    return complete[-1].manifest.sequence if complete else 0


def _record_for(save_dir: Path, name: str) -> Optional[CheckpointRecord]:
    tag_dir = save_dir / name
    internal_tag = tag_of_internal_name(name)
    if internal_tag is not None:
        return _leftover_record(tag_dir, name, internal_tag)
    if not storage.storage_for(tag_dir).exists(tag_dir / MANIFEST_NAME):
        return None
    try:
        manifest = read_manifest(tag_dir)
    except ManifestError as error:
        return CheckpointRecord(name=name, tag=name, damaged=str(error))
    if manifest is None:  # removed since
        return None
    if manifest.tag != name:
        return _not_ours(name, f"its {MANIFEST_NAME} is that of checkpoint {excerpt(manifest.tag)}")
    return CheckpointRecord(name=name, tag=name, manifest=manifest)


def _leftover_record(tag_dir: Path, name: str, tag: str) -> CheckpointRecord:
    """A pending or trash directory; unreadable metadata inside leaves it ours, metadata naming another tag not.

    Its pending marker, or the manifest of a checkpoint replaced or being
    deleted, may be missing (a crash between steps, a deletion under way)
    or unreadable: the name alone then says it is ours.
    """
    leftover = "trash" if name.endswith(TRASH_SUFFIX) else "spare" if name.endswith(SPARE_SUFFIX) else "pending"
    found = {}
    for what, read in (("pending marker", pending_marker_of), (MANIFEST_NAME, read_manifest)):
        try:
            found[what] = read(tag_dir)
        except ManifestError:
            found[what] = None
        if found[what] is not None and found[what].tag != tag:
            return _not_ours(name, f"its {what} names checkpoint {excerpt(found[what].tag)}, not {excerpt(tag)}")
    marker = found["pending marker"]
    after_sequence = marker.after_sequence if leftover == "pending" and marker is not None else None
    return CheckpointRecord(name=name, tag=tag, leftover=leftover, after_sequence=after_sequence)


def _not_ours(name: str, why: str) -> CheckpointRecord:
    return CheckpointRecord(name=name, tag=name, not_ours=f"{why}: a copy or a renamed directory, not ours")


def _order(record: CheckpointRecord):
    return (record.not_ours is not None, not record.complete, record.manifest.sequence if record.complete else 0,
            record.name)
