"""The Hugging Face Trainer with the remote tier: each ``checkpoint-N`` replicated whole, and restored whole.

A Trainer checkpoint is a folder: the DeepSpeed tag directory, and beside
it the Trainer's own ``trainer_state.json``, RNG states, config and weights,
written after ``save_checkpoint`` returns. So that a resume from the remote
tier gets all of it back:

* when a ``Trainer`` is made, rank 0's uploads wait for the Trainer's files
  (``replication.expect_client_files``), and the ``replicate`` section of its
  DeepSpeed config is remembered for the resume;
* at each ``on_save`` (``FastAioTrainerCallback``) the folder is complete:
  ``replication.client_files_ready`` sends it, the Trainer's files as the
  checkpoint's client files (``remote.client_files``);
* ``get_last_checkpoint(output_dir)`` (``resume_from_checkpoint=True``): when
  the remote tier's checkpoint (the one its ``latest`` names, else its newest)
  has a higher step than every complete local ``checkpoint-N``, or there is
  none (a new node, a deleted output_dir), rank 0 restores it into
  ``output_dir/checkpoint-<step>``, every file checked, and every rank
  resumes from there. The Trainer assumes output_dir is shared by its
  processes (``save_on_each_node`` off); so does this.
"""

import logging
from pathlib import Path
from typing import Optional

import torch.distributed

from ds_fastckpt.engine.config import ConfigError
from ds_fastckpt.engine.remote_resume import restore_alone
from ds_fastckpt.engine.replication import client_files_ready, expect_client_files, open_checked_store
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.catalog import read_catalog
from ds_fastckpt.remote.options import ReplicateConfig, ReplicateConfigError, parse_replicate
from ds_fastckpt.remote.store import RemoteError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR + "-"
_replicate: Optional[ReplicateConfig] = None  # of the last Trainer made, for get_last_checkpoint


def trainer_created(trainer) -> None:
    """Notes a new Trainer: its uploads wait for its files, and its ``replicate`` section serves the resume."""
    global _replicate
    config = getattr(getattr(trainer.args, "hf_deepspeed_config", None), "config", None) or {}
    checkpoint = config.get("checkpoint") or {}
    section = (checkpoint.get("fast_aio") or {}).get("replicate") if checkpoint.get("engine") == "fast_aio" else None
    try:
        _replicate = parse_replicate(section)
    except ReplicateConfigError:
        _replicate = None  # deepspeed.initialize reports it, with the rest of the config
    if _replicate is not None:
        expect_client_files()


def replicating() -> bool:
    """Whether the last Trainer made replicates to a remote tier."""
    return _replicate is not None


def checkpoint_saved(output_dir, step: int) -> None:
    """The Trainer finished writing ``output_dir/checkpoint-<step>``: its replication may start. Every process."""
    if _replicate is None:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # each process wrote its own files (rng_state_<rank>.pth) before rank 0 lists
    client_files_ready(Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}")


def newer_from_remote(folder, local: Optional[str]) -> Optional[str]:
    """``local`` (a ``checkpoint-N`` or None), or the remote tier's newer checkpoint restored into ``folder``.

    Every process calls it (``get_last_checkpoint`` runs on each); rank 0 restores, and all get the same answer.
    """
    if _replicate is None:
        return local
    choice = _on_rank_zero(lambda: _restore_if_newer(Path(folder), local))
    if isinstance(choice, RemoteError):
        raise choice
    return choice


def _restore_if_newer(folder: Path, local: Optional[str]):
    local_step = int(Path(local).name[len(CHECKPOINT_PREFIX):]) if local is not None else -1
    try:
        store = open_checked_store(_replicate)
    except ConfigError as error:
        logger.warning("resuming from the local tier only: %s", error)
        return local
    try:
        try:
            choice = read_catalog(store).resume_choice()
        except RemoteError as error:
            logger.warning("resuming from the local tier only: %s", error)
            return local
        if choice is None or choice[1].step is None or choice[1].step <= local_step:
            return local
        tag, manifest = choice
        target = folder / f"{CHECKPOINT_PREFIX}{manifest.step}"
        restore_alone(store, target, tag, manifest)
        for record in manifest.client_files:
            _restore_client_file(store, tag, record, target)
        logger.warning("resuming from %s, restored from %s: it is newer than %s", target, store.describe(),
                       local or f"anything in {folder}")
        return str(target)
    finally:
        store.close()


def _restore_client_file(store, tag: str, record, target: Path) -> None:
    """Downloads one of the Trainer's files into ``target``, checked, replacing a stale one of that name."""
    temporary = target / f".{record.path}.ds_fastckpt-restore"
    store.download_file(layout.file_key(tag, layout.client_path(record.path)), temporary, size=record.bytes,
                        crc32c=record.crc32c)
    temporary.replace(target / record.path)


def _on_rank_zero(action):
    """``action()`` on rank 0, its result (or the error it raised) handed to every rank."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    result = [None]
    if not distributed or torch.distributed.get_rank() == 0:
        try:
            result[0] = action()
        except Exception as error:  # every rank raises it, rather than the others waiting for rank 0
            result[0] = RemoteError(f"restoring from the remote tier failed on rank 0: {type(error).__name__}: "
                                    f"{error}")
    if distributed:
        torch.distributed.broadcast_object_list(result, src=0)
    return result[0]
