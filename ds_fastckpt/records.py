"""What is in a save_dir: our complete checkpoints and our leftovers, nothing else.

Only direct subdirectories that are real directories (never symlinks) are
looked at. A directory counts as ours when it holds our manifest, or carries
the pending/trash name our saves and deletions use.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .atomicity import TRASH_SUFFIX, tag_of_internal_name
from .manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest, read_pending_marker


@dataclass(frozen=True)
class CheckpointRecord:
    """One directory of ours in save_dir.

    Attributes:
        name: the directory name.
        tag: the checkpoint tag it holds or was to hold.
        manifest: set for a complete checkpoint.
        leftover: "pending" or "trash" for the directory of an interrupted save or deletion, else None.
        after_sequence: for a pending leftover, the newest commit when it was started (None if unknown).
        damaged: the reason a manifest could not be read; such a directory is never deleted.
    """

    name: str
    tag: str
    manifest: Optional[Manifest] = None
    leftover: Optional[str] = None
    after_sequence: Optional[int] = None
    damaged: Optional[str] = None

    @property
    def complete(self) -> bool:
        return self.manifest is not None


def scan(save_dir) -> List[CheckpointRecord]:
    """Our checkpoint directories in ``save_dir``, complete ones sorted by commit order first."""
    save_dir = Path(save_dir)
    records = []
    with os.scandir(save_dir) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            record = _record_for(save_dir, entry.name)
            if record is not None:
                records.append(record)
    return sorted(records, key=_order)


def complete_checkpoints(records: List[CheckpointRecord]) -> List[CheckpointRecord]:
    """Complete checkpoints, oldest commit first."""
    return sorted((record for record in records if record.complete), key=lambda record: record.manifest.sequence)


def newest_sequence(records: List[CheckpointRecord]) -> int:
    complete = complete_checkpoints(records)
    return complete[-1].manifest.sequence if complete else 0


def _record_for(save_dir: Path, name: str) -> Optional[CheckpointRecord]:
    internal_tag = tag_of_internal_name(name)
    if internal_tag is not None:
        if name.endswith(TRASH_SUFFIX):
            return CheckpointRecord(name=name, tag=internal_tag, leftover="trash")
        return CheckpointRecord(name=name, tag=internal_tag, leftover="pending",
                                after_sequence=read_pending_marker(save_dir / name))
    if not os.path.lexists(save_dir / name / MANIFEST_NAME):
        return None
    try:
        manifest = read_manifest(save_dir / name)
    except ManifestError as error:
        return CheckpointRecord(name=name, tag=name, damaged=str(error))
    return CheckpointRecord(name=name, tag=name, manifest=manifest)


def _order(record: CheckpointRecord):
    return (not record.complete, record.manifest.sequence if record.complete else 0, record.name)
