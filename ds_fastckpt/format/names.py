"""Every name ds_fastckpt gives to an entry of save_dir, in one place.

``<tag>/``                           a complete checkpoint: it holds ``MANIFEST_NAME`` naming ``<tag>``
``<tag>/ds_fastckpt_manifest.json``  its commit record (``manifest``)
``.<tag>.ds_fastckpt-tmp/``          a save in progress, with ``PENDING_MARKER_NAME`` inside
``.<tag>.ds_fastckpt-trash/``        a checkpoint being deleted
``.<tag>.ds_fastckpt-spare/``        a retired checkpoint whose files the next save writes over (``recycle_retired``)
``.<name>.<hex>.ds_fastckpt-tmp``    a small file being replaced atomically (``atomicity``)
``latest``                           DeepSpeed's hint of the newest tag, written atomically
``.ds_fastckpt.lock``                the lock of the job saving here (``save_dir_lock``)
``.ds_fastckpt-remote.json``         where this save_dir is replicated: ``{"url": ..., "endpoint_url": ...}``, for
                                     ``ds-fastckpt ls`` (written by the engine; read as untrusted)

The pending, trash and spare names mark a directory as ours, so an interrupted save
or deletion can be cleaned up later without touching anything else.
"""

from pathlib import Path
from typing import Optional

MANIFEST_NAME = "ds_fastckpt_manifest.json"
PENDING_MARKER_NAME = ".ds_fastckpt_pending.json"
LATEST_NAME = "latest"
LOCK_NAME = ".ds_fastckpt.lock"
REMOTE_NOTE_NAME = ".ds_fastckpt-remote.json"
PENDING_SUFFIX = ".ds_fastckpt-tmp"
TRASH_SUFFIX = ".ds_fastckpt-trash"
SPARE_SUFFIX = ".ds_fastckpt-spare"


def pending_path(save_dir: Path, tag: str) -> Path:
    return save_dir / f".{tag}{PENDING_SUFFIX}"


def trash_path(save_dir: Path, tag: str) -> Path:
    return save_dir / f".{tag}{TRASH_SUFFIX}"


def spare_path(save_dir: Path, tag: str) -> Path:
    return save_dir / f".{tag}{SPARE_SUFFIX}"


def tag_of_internal_name(name: str) -> Optional[str]:
    """The tag a pending, trash or spare directory name belongs to, or None for any other name."""
    for suffix in (PENDING_SUFFIX, TRASH_SUFFIX, SPARE_SUFFIX):
        if name.startswith(".") and name.endswith(suffix) and len(name) > 1 + len(suffix):
            return name[1:-len(suffix)]
    return None
