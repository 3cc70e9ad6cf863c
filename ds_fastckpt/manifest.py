"""The commit record of a checkpoint: every file with its size and CRC-32C, written last and atomically.

A tag directory that holds ``ds_fastckpt_manifest.json`` is complete; one
without it is not ours or not finished. ``sequence`` orders checkpoints by
commit, whatever their tags are called.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from .atomicity import atomic_write_bytes

MANIFEST_NAME = "ds_fastckpt_manifest.json"
PENDING_MARKER_NAME = ".ds_fastckpt_pending.json"
FORMAT = 1


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint, relative to its tag directory."""

    path: str
    bytes: int
    crc32c: int
    rank: int = 0
    host: str = ""


@dataclass(frozen=True)
class Manifest:
    tag: str
    step: Optional[int]
    sequence: int
    committed_unix_ns: int
    world_size: int
    deepspeed_version: str
    ds_fastckpt_version: str
    files: List[FileRecord] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(record.bytes for record in self.files)

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1).encode()


def read_manifest(tag_dir: Path) -> Optional[Manifest]:
    """The manifest of ``tag_dir``; None when it has none.

    Raises:
        ManifestError: when the manifest exists but is not a valid one.
    """
    path = tag_dir / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        if data.pop("format") != FORMAT:
            raise ValueError("unsupported format")
        files = [FileRecord(**record) for record in data.pop("files")]
        manifest = Manifest(**data, files=files)
        if not isinstance(manifest.sequence, int) or not isinstance(manifest.tag, str):
            raise ValueError("bad field types")
        return manifest
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ManifestError(f"checkpoint manifest {path} is damaged and cannot be read ({error})") from None


def write_manifest(tag_dir: Path, manifest: Manifest, fsync: bool = True) -> None:
    atomic_write_bytes(tag_dir / MANIFEST_NAME, manifest.to_json(), fsync=fsync)


def write_pending_marker(pending_dir: Path, tag: str, after_sequence: int, fsync: bool = True) -> None:
    """Marks a pending directory as ours, and as started after commit number ``after_sequence``."""
    payload = json.dumps({"format": FORMAT, "tag": tag, "after_sequence": after_sequence}).encode()
    atomic_write_bytes(pending_dir / PENDING_MARKER_NAME, payload, fsync=fsync)


def read_pending_marker(pending_dir: Path) -> Optional[int]:
    """``after_sequence`` of a pending directory, or None when its marker is missing or unreadable."""
    try:
        value = json.loads((pending_dir / PENDING_MARKER_NAME).read_bytes())["after_sequence"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None
