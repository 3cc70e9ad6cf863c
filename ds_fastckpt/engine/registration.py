"""Wires the ``fast_aio`` engine into DeepSpeed when ``ds_fastckpt`` is imported.

DeepSpeed picks its checkpoint engine in ``DeepSpeedEngine._configure_checkpointing``
through the name ``create_checkpoint_engine`` imported into
``deepspeed.runtime.engine``; replacing that name makes our engine the one
whose ``is_data_parallel_writer`` decides ``save_non_zero_checkpoint``. Thin
wrappers on ``DeepSpeedEngine`` act only when the engine is ours:
``save_checkpoint`` validates the tag before any filesystem call, lets the
engine write ``latest`` atomically, and marks a checkpoint whose save raised
so it is never committed; ``load_checkpoint`` first commits a checkpoint
still in flight, then, without a tag, resumes from the checkpoint ``latest``
names when it is complete and intact, else the newest complete one (the newest
intact one with ``skip_damaged_on_resume``; what ``latest_universal`` names
with ``load_universal``), and checks the files against the manifest first;
``destroy`` also cleans up a synchronous engine of ours (DeepSpeed does so
for decoupled ones only), which releases its save_dir lock. Outside DeepSpeed,
``torch.distributed.destroy_process_group()`` of the whole world first commits every
async checkpoint in flight, while the ranks can still agree on it. Installing twice changes nothing.
"""

import functools
import inspect
import logging
from pathlib import Path
from typing import List, Optional

import deepspeed.runtime.engine as ds_engine_module
import torch.distributed
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_fastckpt.decisions.resume import SKIP_OPTION, choose_resume_tag, pending_checkpoint_error, uncommitted_tags
from ds_fastckpt.engine import in_flight
from ds_fastckpt.engine.checkpoint_engine import FastAioCheckpointEngine
from ds_fastckpt.engine.config import FAST_AIO, ConfigError, aio_tuning, engine_name, parse_fast_aio
from ds_fastckpt.format.integrity import CheckpointIntegrityError
from ds_fastckpt.format.tags import validate_tag

logger = logging.getLogger(__name__)

_MARK = "_ds_fastckpt_hook"


def install() -> None:
    """Hooks DeepSpeed; idempotent."""
    if not getattr(ds_engine_module.create_checkpoint_engine, _MARK, False):
        ds_engine_module.create_checkpoint_engine = _hook_create(ds_engine_module.create_checkpoint_engine)
    if not getattr(DeepSpeedEngine.save_checkpoint, _MARK, False):
        DeepSpeedEngine.save_checkpoint = _hook_save(DeepSpeedEngine.save_checkpoint)
    if not getattr(DeepSpeedEngine.load_checkpoint, _MARK, False):
        DeepSpeedEngine.load_checkpoint = _hook_load(DeepSpeedEngine.load_checkpoint)
    if not getattr(DeepSpeedEngine.destroy, _MARK, False):
        DeepSpeedEngine.destroy = _hook_destroy(DeepSpeedEngine.destroy)
    c10d = torch.distributed.distributed_c10d
    if not getattr(c10d.destroy_process_group, _MARK, False):
        c10d.destroy_process_group = _hook_destroy_process_group(c10d.destroy_process_group)
    if not getattr(torch.distributed.destroy_process_group, _MARK, False):
        torch.distributed.destroy_process_group = c10d.destroy_process_group


def create_engine(config_params, groups=None, zero_stage: int = 0, has_moe_layers: bool = False):
    """Our engine when ``checkpoint.engine`` is ``"fast_aio"``, None for DeepSpeed's own choice.

    ``groups``, ``zero_stage`` and ``has_moe_layers`` are what DeepSpeed hands
    ``create_checkpoint_engine``; they decide whether ``parallel_writers`` applies.

    Raises:
        ConfigError: for an unknown engine name or a bad ``fast_aio`` / ``aio`` value.
    """
    section = (getattr(config_params, "_param_dict", None) or {}).get("checkpoint") or {}
    if engine_name(section) != FAST_AIO:
        return None
    if section.get("writer") is not None:
        raise ConfigError("checkpoint.writer selects DeepSpeed's own FastCheckpointEngine and cannot be combined "
                          "with checkpoint.engine='fast_aio': remove one of them")
    options = parse_fast_aio(section)
    tuning = aio_tuning(getattr(config_params, "aio_config", None) or {})
    node_local = bool(getattr(config_params, "use_node_local_storage", False))  # not in checkpoint_config
    mode = options.parallel_writers
    explicit = "parallel_writers" in options.model_fields_set
    if node_local and not explicit:
        mode = "node"  # the default's meaning with node-local storage: every host writes its own copy
    data_parallel_ranks = _parallel_writer_ranks(mode, explicit, node_local, groups, zero_stage, has_moe_layers)
    return FastAioCheckpointEngine(config_params, options, tuning, node_local=node_local,
                                   data_parallel_ranks=data_parallel_ranks, parallel_writers=mode)


def _parallel_writer_ranks(mode: str, explicit: bool, node_local: bool, groups, zero_stage: int,
                           has_moe_layers: bool) -> Optional[List[int]]:
    """This rank's data-parallel group when ``parallel_writers`` applies; None when every file has one writer.

    ``explicit``: the user set ``parallel_writers``; only then is a mode that cannot apply worth a message.

    Raises:
        ConfigError: for ``"all"`` with node-local storage.
    """
    if mode == "off":
        return None
    if mode == "all" and node_local:
        raise ConfigError("checkpoint.fast_aio.parallel_writers='all' writes one copy of the model states from "
                          "ranks on every host, but checkpoint.use_node_local_storage keeps a copy on each host: "
                          "use 'node' (the ranks of each host write that host's copy) or 'off'")
    if zero_stage >= 3:
        logger.log(logging.INFO if explicit else logging.DEBUG, "parallel_writers=%r changes nothing with ZeRO "
                   "stage 3: every rank saves its own model states already", mode)
        return None
    if has_moe_layers:
        logger.log(logging.WARNING if explicit else logging.DEBUG, "parallel_writers=%r is not used with MoE "
                   "layers (DeepSpeed picks expert-file writers by the same rule); every file has one writer", mode)
        return None
    if groups is None or not torch.distributed.is_initialized():
        return None
    return torch.distributed.get_process_group_ranks(groups._get_sequence_data_parallel_group())


def _mark(function):
    setattr(function, _MARK, True)
    return function


def _hook_create(original):

    @functools.wraps(original)
    def create_checkpoint_engine(config_params, *args, **kwargs):
        parallelism = {name: kwargs[name] for name in ("groups", "zero_stage", "has_moe_layers") if name in kwargs}
        engine = create_engine(config_params, **parallelism) if config_params is not None else None
        return engine if engine is not None else original(config_params, *args, **kwargs)

    return _mark(create_checkpoint_engine)


def _bind_if_ours(signature, self, args, kwargs):
    """The call's arguments, defaults applied, when ``self`` uses our engine; None otherwise."""
    if not isinstance(getattr(self, "checkpoint_engine", None), FastAioCheckpointEngine):
        return None
    bound = signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    return bound


def _hook_save(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_checkpoint(self, *args, **kwargs):
        bound = _bind_if_ours(signature, self, args, kwargs)
        if bound is None:
            return original(self, *args, **kwargs)
        tag = bound.arguments["tag"]
        tag = validate_tag(f"global_step{self.global_steps}" if tag is None else tag)
        replicated, per_rank = None, ()
        if self.checkpoint_engine.writes_in_parallel:  # the model-states file every data-parallel rank saves
            replicated = self._get_ckpt_name(bound.arguments["save_dir"], tag)
            # What _broadcast_model leaves per rank (OptimizedLinear's sharded base weights): the leader's alone
            per_rank = [param for param in self.module.parameters() if hasattr(param, "ds_optim_param")]
        self.checkpoint_engine.prepare_save(step=self.global_steps, save_latest=bound.arguments["save_latest"],
                                            replicated=replicated, per_rank=per_rank)
        bound.arguments["save_latest"] = False  # the engine writes it, atomically, in commit()
        try:
            return original(*bound.args, **bound.kwargs)
        except BaseException as error:
            self.checkpoint_engine.save_aborted(error)  # a half-written checkpoint is never committed later
            raise

    return _mark(save_checkpoint)


def _hook_destroy(original):

    @functools.wraps(original)
    def destroy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        checkpoint_engine = getattr(self, "checkpoint_engine", None)
        # DeepSpeed cleans up decoupled engines only; ours also holds the save_dir lock.
        if isinstance(checkpoint_engine, FastAioCheckpointEngine) and not checkpoint_engine.is_decoupled():
            checkpoint_engine.cleanup()
        return result

    return _mark(destroy)


def _hook_destroy_process_group(original):
    """Commits every async checkpoint in flight before the default group (and the engine's gloo groups) go.

    ``destroy_process_group()`` (accelerate's ``end_training()``, the last line of many scripts) runs on
    every rank, so the ranks commit together, as at an optimizer step. Without it the checkpoint could only
    be left pending at exit: the ranks cannot agree on a commit without a process group.
    """

    @functools.wraps(original)
    def destroy_process_group(group=None, *args, **kwargs):
        whole_world = group is None or group is torch.distributed.GroupMember.WORLD
        if whole_world and torch.distributed.is_initialized():
            try:
                in_flight.wait_all()  # every rank destroys the world, so every rank commits here
            except BaseException:  # the commit failed on every rank: the groups still go, then the error is raised
                original(group, *args, **kwargs)
                raise
        return original(group, *args, **kwargs)

    return _mark(destroy_process_group)


def _refuse_pending_tag(load_dir: Path, tag: str) -> None:
    """Raises ``PendingCheckpointError`` when ``tag`` in ``load_dir`` exists only as an uncommitted pending directory.

    Called after this process's own checkpoint in flight is committed: what is
    still pending was left by a process that ended mid-save.
    """
    if (load_dir / str(tag)).exists() or tag not in uncommitted_tags(load_dir, [tag]):
        return  # the usual case costs one stat
    try:
        instead, _ = choose_resume_tag(load_dir)
    except CheckpointIntegrityError:
        instead = None
    what_to_do = (f"load_checkpoint({str(load_dir)!r}) without a tag loads {instead!r}, the checkpoint to resume "
                  "from there." if instead is not None else f"{load_dir} holds no complete checkpoint.")
    raise pending_checkpoint_error(load_dir, tag, instead, what_to_do)


def _hook_load(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint(self, *args, **kwargs):
        bound = _bind_if_ours(signature, self, args, kwargs)
        if bound is None:
            return original(self, *args, **kwargs)
        self.checkpoint_engine.wait()  # a checkpoint still in flight is what the caller may be about to load
        load_dir = Path(bound.arguments["load_dir"])
        tag = bound.arguments["tag"]
        resuming = tag is None
        if resuming and self.load_universal_checkpoint():
            return original(*bound.args, **bound.kwargs)  # DeepSpeed's 'latest_universal' names the folder
        if resuming:
            tag, reason = self.checkpoint_engine.resume_tag(load_dir)
            if tag is None:
                logger.warning("nothing to resume: %s", reason)
                return None, None
            bound.arguments["tag"] = tag
        if not resuming:
            _refuse_pending_tag(load_dir, tag)  # else DeepSpeed's bare AssertionError from check_ckpt_list
        try:
            self.checkpoint_engine.verify_before_load(load_dir.absolute() / validate_tag(tag))
            return original(*bound.args, **bound.kwargs)
        except CheckpointIntegrityError as error:
            if not resuming or self.checkpoint_engine.options.skip_damaged_on_resume:
                raise
            raise CheckpointIntegrityError(f"{error}; set {SKIP_OPTION}=true to resume from the newest intact "
                                           "checkpoint instead") from error

    return _mark(load_checkpoint)
