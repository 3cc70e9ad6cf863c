"""Checkpoints an async save left pending, and the error that names them.

With ``"async": true`` a checkpoint is written to ``.<tag>.ds_fastckpt-tmp``
and renamed to ``<tag>`` at the next optimizer step. A process killed in
between leaves only the pending directory. Frameworks that save more than the
DeepSpeed checkpoint into a folder of their own (the Hugging Face Trainer's
``checkpoint-N``, accelerate's ``checkpoints/checkpoint_N``) write the rest of
that folder at once, so the folder looks complete while its DeepSpeed tag is
not. These helpers tell such folders apart; the error that says what is pending
and what to load instead, ``PendingCheckpointError``, lives in
``ds_fastckpt.decisions.resume`` (the engine's load hook raises it too) and
is re-exported here.
"""

import re
from pathlib import Path
from typing import List

from ds_fastckpt.decisions.resume import (PendingCheckpointError, choose_resume_tag, pending_checkpoint_error,
                                          uncommitted_tags)
from ds_fastckpt.format.integrity import CheckpointIntegrityError

__all__ = ["PendingCheckpointError", "is_pending_only", "numbered_siblings", "pending_checkpoint_error",
           "uncommitted_tags"]

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def is_pending_only(folder) -> bool:
    """Whether ``folder`` holds a pending checkpoint of ours and nothing ``load_checkpoint(folder)`` resumes from.

    A folder whose checkpoint is damaged is not "pending only": loading it
    reports the damage.
    """
    folder = Path(folder)
    if not uncommitted_tags(folder):
        return False
    try:
        tag, _ = choose_resume_tag(folder)
    except CheckpointIntegrityError:
        return False
    return tag is None


def numbered_siblings(folder) -> List[Path]:
    """The directories beside ``folder`` named like it (same prefix, a number at the end), by that number.

    ``checkpoint_3`` gives every ``checkpoint_<N>``, ``checkpoint-3`` every ``checkpoint-<N>``; ``folder``
    itself is among them. A name without a number at the end gives ``[folder]``.
    """
    folder = Path(folder)
    match = _NUMBERED.match(folder.name)
    if match is None or not folder.parent.is_dir():
        return [folder]
    found = []
    for entry in folder.parent.iterdir():
        other = _NUMBERED.match(entry.name)
        if other is not None and other.group(1) == match.group(1) and entry.is_dir() and not entry.is_symlink():
            found.append((int(other.group(2)), entry))
    return [path for _, path in sorted(found)]
