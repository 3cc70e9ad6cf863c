"""How the ranks agree on a save: an all-gather with a deadline, and leader actions every rank hears the end of."""

from typing import Any, Callable, Optional

from ds_fastckpt.engine import collectives


class CommitError(RuntimeError):
    """A save could not be committed; the previous complete checkpoint is untouched."""


class RankGroup:
    """The engine's collectives, on a gloo group of their own that gives up after ``timeout_s``.

    A rank that died or hangs costs the others a bounded wait and a
    ``CommitError``, never a hang. Creating one is collective: every rank
    must do it, in the same order.

    Args:
        timeout_s: ``commit_timeout_s``, how long a rank waits for the others.
        group: a bounded group of some of the ranks to talk on instead of all of them (``bounded_subgroup``).
    """

    def __init__(self, timeout_s: float, group: Optional[Any] = None):
        self.timeout_s = timeout_s
        self._group = collectives.bounded_group(timeout_s) if group is None else group
        # Fixed for the engine's life: after destroy_process_group() torch answers rank 0 of a world of 1.
        self.rank = collectives.rank()
        self.world_size = collectives.world_size()

    @property
    def connected(self) -> bool:
        """False once the process group the ranks talked on is gone (``destroy_process_group()``)."""
        return self.world_size == 1 or collectives.initialized()

    def gather(self, obj: Any, failure: str) -> list:
        """``obj`` from every rank, in rank order.

        Raises:
            CommitError: starting with ``failure``, when a rank does not join within the timeout, or when the
                process group is gone (each rank would otherwise act as if alone: rank 0, leader, world of 1).
        """
        if not self.connected:
            raise CommitError(f"{failure}: the process group of its {self.world_size} ranks is gone "
                              "(torch.distributed.destroy_process_group() ran first), so the ranks cannot agree on "
                              "it; restart the job to resume from the last complete checkpoint")
        try:
            return collectives.all_gather_object(obj, self._group)
        except collectives.CollectiveError as error:
            raise CommitError(f"{failure}: not every rank joined within commit_timeout_s={self.timeout_s} s (a rank "
                              f"died, hung or failed outside the checkpoint engine); restart the job to resume from "
                              f"the last complete checkpoint: {error}") from error

    def on_leader(self, leader: bool, action: Callable[[], None], failure: str) -> None:
        """Runs ``action`` where ``leader`` is true; if it fails anywhere, every rank raises instead of waiting.

        Raises:
            Exception: the leader re-raises its own error; the other ranks raise ``CommitError`` naming it.
        """
        error = None
        if leader:
            try:
                action()
            except Exception as caught:  # re-raised below, after every rank has heard of it
                error = caught
        report = None if error is None else f"{type(error).__name__}: {error}"
        reports = [message for message in self.gather(report, failure) if message]
        if error is not None:
            raise error
        if reports:
            raise CommitError(f"{failure}: {reports[0]}")
