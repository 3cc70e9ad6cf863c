"""The few collectives the engine needs, also correct in a process without torch.distributed."""

from typing import Any, List

from deepspeed import comm as dist


def _initialized() -> bool:
    return dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """``obj`` from every rank, in rank order."""
    if not _initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
