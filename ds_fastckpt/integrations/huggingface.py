"""The Hugging Face ``Trainer`` with the fast_aio checkpoint engine.

The Trainer saves a DeepSpeed checkpoint into ``output_dir/checkpoint-N``
at every save and loads it back with ``engine.load_checkpoint(checkpoint-N)``
when it resumes or loads the best model at the end; before loading it globs
for ``checkpoint-N/global_step*``. Two things follow with ``"async": true``:

* A job killed right after a save leaves the newest ``checkpoint-N`` with its
  DeepSpeed tag still pending (``.global_stepN.ds_fastckpt-tmp``), which
  ``resume_from_checkpoint=True`` picks and then fails on ("Can't find a valid
  checkpoint"). ``last_complete_checkpoint(output_dir)`` names the newest
  ``checkpoint-N`` that really resumes::

      trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))

* The last save of a run is still in flight when ``load_best_model_at_end``
  loads it. ``FastAioTrainerCallback`` commits it first::

      trainer = Trainer(..., callbacks=[FastAioTrainerCallback()])

* The Trainer deletes old ``checkpoint-N`` directories right after a save
  whose tag is still in flight: keep ``save_total_limit`` at 2 or more, so a
  complete checkpoint is always left.

Importing ``ds_fastckpt`` does both without any of this
(``ds_fastckpt.integrations.wiring``): ``patch_trainer_utils``,
``patch_deepspeed_integration`` and ``patch_trainer`` below make
``get_last_checkpoint`` (``resume_from_checkpoint=True``) pass over a
``checkpoint-N`` whose only DeepSpeed tag is pending, make
``deepspeed_load_checkpoint`` commit the checkpoint in flight before it looks
for ``global_step*`` (and name a pending one rather than "Can't find a valid
checkpoint"), and give every ``Trainer`` a ``FastAioTrainerCallback``.

Importing this module does not import ``transformers``; accessing
``FastAioTrainerCallback`` does (the class subclasses
``transformers.TrainerCallback``).
"""

import functools
import glob
import logging
import os
import re
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ds_fastckpt.decisions.resume import choose_resume_tag
from ds_fastckpt.engine.in_flight import wait, wait_all
from ds_fastckpt.format.integrity import CheckpointIntegrityError
from ds_fastckpt.integrations import hf_remote
from ds_fastckpt.integrations.pending_checkpoints import (is_pending_only, pending_checkpoint_error,
                                                          uncommitted_tags)

logger = logging.getLogger(__name__)

__all__ = ["FastAioTrainerCallback", "last_complete_checkpoint"]

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR + "-N"


def last_complete_checkpoint(output_dir) -> Optional[str]:
    """The newest ``output_dir/checkpoint-N`` that holds a complete DeepSpeed checkpoint.

    "Complete" means what ``engine.load_checkpoint(checkpoint-N)`` without a
    tag would resume from (see ``ds_fastckpt.decisions.resume.choose_resume_tag``): a
    ``checkpoint-N`` whose only DeepSpeed tag is still pending, because the
    job died while an async save was in flight, is passed over for an older
    one. A ``checkpoint-N`` whose checkpoint is damaged
    (``CheckpointIntegrityError``) is passed over with a warning.

    Args:
        output_dir: the Trainer's ``args.output_dir``.

    Returns:
        The path of that ``checkpoint-N`` (``output_dir`` joined with its
        name, as ``transformers.trainer_utils.get_last_checkpoint`` returns
        it), or None when there is none: pass it to
        ``trainer.train(resume_from_checkpoint=...)``, where None starts from
        scratch.
    """
    for step, path in reversed(_checkpoint_dirs(output_dir)):
        try:
            tag, reason = choose_resume_tag(path)
        except CheckpointIntegrityError as error:
            logger.warning("skipping %s: its checkpoint is damaged: %s", path, error)
            continue
        if tag is not None:
            return os.path.join(str(output_dir), path.name)
        logger.warning("skipping %s: %s", path, reason)
    return None


def _checkpoint_dirs(output_dir) -> List[Tuple[int, Path]]:
    """``(N, path)`` of every ``checkpoint-N`` directory in ``output_dir``, by N."""
    output_dir = Path(output_dir)
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _CHECKPOINT_DIR.match(name)
        if match is not None and (output_dir / name).is_dir():
            found.append((int(match.group(1)), output_dir / name))
    return sorted(found)


def _commit_in_flight(why: str) -> None:
    logger.debug("committing the checkpoint in flight: %s", why)
    wait_all()


def _make_callback_class():
    from transformers import TrainerCallback

    class FastAioTrainerCallback(TrainerCallback):
        """Commits the async fast_aio checkpoint in flight before the Trainer needs it.

        With ``"async": true`` a checkpoint is committed at the next optimizer
        step, so the Trainer's last save is still in flight when training
        ends. ``load_best_model_at_end`` then fails when the best checkpoint is
        that last one (the Trainer finds no ``global_step*`` in it), and a job
        killed after ``train()`` returns loses it. This callback commits it on
        every rank (``ds_fastckpt.wait_all()``) at the save that ends
        training (``state.global_step >= state.max_steps`` or
        ``control.should_training_stop``) and at ``on_train_end``. Saves in
        the middle of a run stay asynchronous. Harmless with synchronous
        saves and other checkpoint engines. Importing ``ds_fastckpt`` adds one
        to every ``Trainer`` (right after ``DefaultFlowCallback``) unless one
        is passed.

        Example:
            trainer = Trainer(model=model, args=args, train_dataset=data,
                              callbacks=[FastAioTrainerCallback()])
        """

        def on_save(self, args, state, control, **kwargs):
            hf_remote.checkpoint_saved(args.output_dir, state.global_step)  # before a commit, which uploads it
            if state.global_step >= state.max_steps or control.should_training_stop:
                _commit_in_flight(f"the save at step {state.global_step} ends training")
            return control

        def on_train_end(self, args, state, control, **kwargs):
            _commit_in_flight("training ended")
            return control

    FastAioTrainerCallback.__module__ = __name__
    FastAioTrainerCallback.__qualname__ = "FastAioTrainerCallback"
    return FastAioTrainerCallback


_callback_class = None
_WIRED = "_ds_fastckpt_wired"
_FROM_REMOTE = "_ds_fastckpt_from_remote"


def _wired(wrapper, original):
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _WIRED, True)
    return wrapper


def _resumable_last_checkpoint(original, from_remote: bool = False):
    """``get_last_checkpoint`` that passes over a newest ``checkpoint-N`` whose DeepSpeed tag is only pending.

    ``from_remote``: also restore a newer checkpoint from the remote tier (``hf_remote.newer_from_remote``). Only
    the name ``Trainer.train`` calls does, on every process at once: a script's own call may come from one process.
    """

    def newer(folder, found):
        return hf_remote.newer_from_remote(folder, found) if from_remote else found

    def get_last_checkpoint(folder, *args, **kwargs):
        try:
            found = original(folder, *args, **kwargs)
        except FileNotFoundError:  # another process has not made output_dir again yet: it may come from remote
            if not (from_remote and hf_remote.replicating()):
                raise
            found = None
        if found is None or not is_pending_only(found):
            return newer(folder, found)
        instead = last_complete_checkpoint(folder)
        logger.warning("%s holds DeepSpeed checkpoint %s only as a pending directory, never committed (the job "
                       "ended while its async save was in flight): %s", found, ", ".join(uncommitted_tags(found)),
                       f"resuming from {instead}, the newest complete checkpoint" if instead is not None
                       else "no complete checkpoint is left locally")
        return newer(folder, instead)

    return _wired(get_last_checkpoint, original)


def _committing_load(original):
    """``deepspeed_load_checkpoint`` that commits the checkpoint in flight first and names a pending one."""

    def deepspeed_load_checkpoint(deepspeed_engine, checkpoint_path, *args, **kwargs):
        # load_best_model_at_end's checkpoint is often the last save, still in flight: commit it before the
        # Trainer globs for global_step*. Every rank gets here.
        wait(deepspeed_engine)
        if not glob.glob(f"{glob.escape(str(checkpoint_path))}/global_step*"):
            pending = uncommitted_tags(checkpoint_path)
            if pending:
                folder = Path(checkpoint_path)
                instead = last_complete_checkpoint(folder.parent)
                what_to_do = (f"Resume from {instead}, the newest complete checkpoint: "
                              f"trainer.train(resume_from_checkpoint={instead!r}), or resume_from_checkpoint=True, "
                              "which picks it." if instead is not None
                              else f"No complete checkpoint is in {folder.parent}: train without resuming.")
                raise pending_checkpoint_error(folder, pending[-1], instead, what_to_do)
        return original(deepspeed_engine, checkpoint_path, *args, **kwargs)

    return _wired(deepspeed_load_checkpoint, original)


def _init_with_callback(original):
    """``Trainer.__init__`` that adds a ``FastAioTrainerCallback`` right after ``DefaultFlowCallback``.

    First among the callbacks that are not the Trainer's own, so the final save is committed before any
    user callback changes the weights. None is added when the user passed one.
    """

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        hf_remote.trainer_created(self)
        handler = getattr(self, "callback_handler", None)
        callback_class = _callback_type()
        if handler is None or any(isinstance(callback, callback_class) for callback in handler.callbacks):
            return
        from transformers.trainer_callback import DefaultFlowCallback

        flow = [index for index, callback in enumerate(handler.callbacks) if isinstance(callback, DefaultFlowCallback)]
        handler.callbacks.insert(flow[0] + 1 if flow else 0, callback_class())

    return _wired(__init__, original)


def _patch_attribute(owner, name: str, wrap) -> None:
    original = getattr(owner, name, None)
    if original is not None and not getattr(original, _WIRED, False):
        setattr(owner, name, wrap(original))


def patch_trainer_utils(module) -> None:
    """Wraps ``transformers.trainer_utils.get_last_checkpoint``; idempotent."""
    _patch_attribute(module, "get_last_checkpoint", _resumable_last_checkpoint)


def patch_deepspeed_integration(module) -> None:
    """Wraps ``transformers.integrations.deepspeed.deepspeed_load_checkpoint``; idempotent."""
    _patch_attribute(module, "deepspeed_load_checkpoint", _committing_load)


def patch_trainer(module) -> None:
    """Wraps the names ``transformers.trainer`` imported before it was patched, and ``Trainer.__init__``; idempotent."""
    current = getattr(module, "get_last_checkpoint", None)
    if current is not None and not getattr(current, _FROM_REMOTE, False):
        # The name may hold trainer_utils' function wired already (imported after it was patched): rewire its original.
        original = current.__wrapped__ if getattr(current, _WIRED, False) else current
        module.get_last_checkpoint = _resumable_last_checkpoint(original, from_remote=True)
        setattr(module.get_last_checkpoint, _FROM_REMOTE, True)
    _patch_attribute(module, "deepspeed_load_checkpoint", _committing_load)
    trainer_class = getattr(module, "Trainer", None)
    if trainer_class is not None:
        _patch_attribute(trainer_class, "__init__", _init_with_callback)


def _callback_type():
    global _callback_class
    if _callback_class is None:
        _callback_class = _make_callback_class()
    return _callback_class


def __getattr__(name: str) -> Any:
    """Builds ``FastAioTrainerCallback`` on first access, so importing this module never imports transformers."""
    if name == "FastAioTrainerCallback":
        return _callback_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
