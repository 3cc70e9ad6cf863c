"""The few collectives the engine needs, also correct in a process without torch.distributed.

The engine's own collectives run on a gloo group of their own whose
operations fail after a timeout the engine chooses: a rank that died or hung
mid-save then gives the others an error within that time, instead of a wait
as long as the default group's (30 minutes or more, or forever with NCCL
when error handling is off). gloo also keeps small object exchanges off the
GPU when the default backend is NCCL.
"""

from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch.distributed
from deepspeed import comm as dist

_groups: Dict[tuple, Any] = {}


class CollectiveError(RuntimeError):
    """Another rank did not take part in one of the engine's collectives in time, or its connection broke."""


def initialized() -> bool:
    """Whether the default process group exists (it does not before init, nor after ``destroy_process_group()``)."""
    return dist.is_initialized()


def _alone() -> bool:
    """No other rank to talk to: no process group, or a world of one (then collectives are skipped,
    which also keeps them out of interpreter exit, where process-group teardown races)."""
    return not initialized() or dist.get_world_size() == 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def bounded_group(timeout_s: float) -> Optional[Any]:
    """A gloo group of all ranks whose operations time out after ``timeout_s``; None when alone.

    Creating it is itself collective: every rank must call this, in the same
    order. One group per timeout and default group is made per process.
    """
    if _alone():
        return None
    key = (id(torch.distributed.group.WORLD), timeout_s)
    if key not in _groups:
        _groups[key] = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return _groups[key]


def bounded_subgroup(ranks: List[int], timeout_s: float) -> Any:
    """A gloo group of ``ranks`` whose operations time out after ``timeout_s``.

    Collective like ``bounded_group``: every rank calls it for every subgroup, in the same order, members or
    not. One group per set of ranks, timeout and default group is made per process.
    """
    key = (id(torch.distributed.group.WORLD), tuple(sorted(ranks)), timeout_s)
    if key not in _groups:
        _groups[key] = torch.distributed.new_group(ranks=list(key[1]), backend="gloo",
                                                   timeout=timedelta(seconds=timeout_s))
    return _groups[key]


def all_gather_object(obj: Any, group: Optional[Any] = None) -> List[Any]:
    """``obj`` from every rank of ``group`` (default: all), in rank order.

    Raises:
        CollectiveError: when ``group`` is a bounded group and a rank did not
            join in time or its connection broke (the backend's message is kept).
    """
    if _alone():
        return [obj]
    gathered = [None] * dist.get_world_size(group=group)
    try:
        dist.all_gather_object(gathered, obj, group=group)
    except RuntimeError as error:  # gloo's DistBackendError: a timeout or a peer that closed its connection
        raise CollectiveError(f"{type(error).__name__}: {error}") from error
    return gathered
