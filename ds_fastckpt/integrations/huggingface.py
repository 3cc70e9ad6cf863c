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

Importing this module does not import ``transformers``; accessing
``FastAioTrainerCallback`` does (the class subclasses
``transformers.TrainerCallback``).
"""

import logging
import os
import re
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ds_fastckpt.decisions.resume import choose_resume_tag
from ds_fastckpt.engine.in_flight import wait_all
from ds_fastckpt.format.integrity import CheckpointIntegrityError

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
        saves and other checkpoint engines.

        Example:
            trainer = Trainer(model=model, args=args, train_dataset=data,
                              callbacks=[FastAioTrainerCallback()])
        """

        def on_save(self, args, state, control, **kwargs):
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


def __getattr__(name: str) -> Any:
    """Builds ``FastAioTrainerCallback`` on first access, so importing this module never imports transformers."""
    global _callback_class
    if name == "FastAioTrainerCallback":
        if _callback_class is None:
            _callback_class = _make_callback_class()
        return _callback_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
