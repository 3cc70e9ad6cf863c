"""The few collectives the engine needs, also correct in a process without torch.distributed."""

from typing import Any, List

from deepspeed import comm as dist


def _initialized() -> bool:
    return dist.is_initialized()


def _alone() -> bool:
    """No other rank to talk to: no process group, or a world of one (then collectives are skipped,
    which also keeps them out of interpreter exit, where process-group teardown races)."""
    return not _initialized() or dist.get_world_size() == 1


def rank() -> int:
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def all_gather_object(obj: Any) -> List[Any]:
    """``obj`` from every rank, in rank order."""
    if _alone():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered

