"""``accelerate``'s ``Accelerator.load_state`` with async fast_aio checkpoints.

With DeepSpeed, ``accelerator.save_state(folder)`` saves the DeepSpeed
checkpoint as tag ``pytorch_model`` (``pytorch_model_<i>`` for a second
model) into ``folder``, and writes the RNG, sampler and scheduler states
beside it at once. With ``"async": true`` the tag stays pending
(``.pytorch_model.ds_fastckpt-tmp``) until the next optimizer step, so a job
killed right after ``save_state()`` leaves a folder whose accelerate files are
there and whose model is not. ``load_state()`` with
``ProjectConfiguration(automatic_checkpoint_naming=True)`` picks the newest
``checkpoints/checkpoint_N`` by number, and DeepSpeed then fails with a bare
``AssertionError``.

``patch_accelerator`` wraps ``load_state``, when ``ds_fastckpt`` is imported
(``ds_fastckpt.integrations.wiring``), so that it first commits a checkpoint
of this process still in flight; then, picking automatically, passes over the
newest folders whose model tag is only pending, with a warning, and loads the
newest complete one (everything in it belongs to the same save, so the
resume is consistent); and, given such a folder, raises
``PendingCheckpointError`` naming it and the newest complete folder to load.
"""

import functools
import logging
import os
import re
from pathlib import Path
from typing import List, Optional

from ds_fastckpt.engine.in_flight import wait
from ds_fastckpt.integrations.pending_checkpoints import (PendingCheckpointError, numbered_siblings,
                                                          pending_checkpoint_error, uncommitted_tags)

logger = logging.getLogger(__name__)

__all__ = ["patch_accelerator"]

_WIRED = "_ds_fastckpt_wired"
_MODEL_NAME = "pytorch_model"  # accelerate.utils.MODEL_NAME: the DeepSpeed tag of the first model


def _model_tags(accelerator) -> List[str]:
    return [_MODEL_NAME if index == 0 else f"{_MODEL_NAME}_{index}" for index in range(len(accelerator._models))]


def _uses_deepspeed(accelerator) -> bool:
    return getattr(getattr(accelerator, "distributed_type", None), "name", None) == "DEEPSPEED"


def _newest_folder(checkpoints_dir: Path) -> Optional[Path]:
    """The folder ``load_state()`` picks by itself: the one whose name ends in the highest number."""
    numbered = []
    for name in os.listdir(checkpoints_dir):
        digits = re.findall(r"[\/]?([0-9]+)(?=[^\/]*$)", name)  # accelerate's own rule
        if digits:
            numbered.append((int(digits[0]), checkpoints_dir / name))
    return max(numbered)[1] if numbered else None


def _newest_complete(folders: List[Path], tags: List[str]) -> Optional[Path]:
    """The newest of ``folders`` (by number) where every model tag is a directory, or None."""
    for folder in reversed(folders):
        if all((folder / tag).is_dir() for tag in tags):
            return folder
    return None


def _error_for(folder: Path, tag: str, tags: List[str]) -> PendingCheckpointError:
    instead = _newest_complete(numbered_siblings(folder), tags)
    if instead is not None:
        what_to_do = (f"The newest complete checkpoint folder is {instead}: load it with "
                      f"accelerator.load_state({str(instead)!r}) (with automatic_checkpoint_naming, "
                      "accelerator.load_state() picks it).")
    else:
        what_to_do = f"No complete checkpoint folder is beside it in {folder.parent}: start from scratch."
    return pending_checkpoint_error(folder, tag, str(instead) if instead is not None else None, what_to_do)


def _load_state_skipping_pending(original):

    def load_state(self, input_dir=None, *args, **kwargs):
        if not _uses_deepspeed(self):
            return original(self, input_dir, *args, **kwargs)
        for model in self._models:
            wait(model)  # this process's own save in flight is committed, then loaded like any other
        tags = _model_tags(self)
        if input_dir is not None:
            folder = Path(os.path.expanduser(input_dir))
            pending = uncommitted_tags(folder, tags)
            if pending:
                raise _error_for(folder, pending[0], tags)
        elif self.project_configuration.automatic_checkpoint_naming:
            checkpoints_dir = Path(self.project_dir) / "checkpoints"
            newest = _newest_folder(checkpoints_dir) if checkpoints_dir.is_dir() else None
            pending = uncommitted_tags(newest, tags) if newest is not None else []
            if pending:
                instead = _newest_complete(numbered_siblings(newest), tags)
                if instead is None:
                    raise _error_for(newest, pending[0], tags)
                logger.warning("%s holds DeepSpeed checkpoint %r only as a pending directory, never committed (the "
                               "job ended while its async save was in flight): loading %s, the newest complete "
                               "checkpoint folder", newest, pending[0], instead)
                input_dir = str(instead)
        return original(self, input_dir, *args, **kwargs)

    functools.update_wrapper(load_state, original)
    setattr(load_state, _WIRED, True)
    return load_state


def patch_accelerator(module) -> None:
    """Wraps ``accelerate.accelerator.Accelerator.load_state``; idempotent."""
    accelerator_class = getattr(module, "Accelerator", None)
    original = getattr(accelerator_class, "load_state", None)
    if original is not None and not getattr(original, _WIRED, False):
        accelerator_class.load_state = _load_state_skipping_pending(original)
