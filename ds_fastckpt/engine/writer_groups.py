"""This rank's writer group for ``parallel_writers``: the ranks that write a replicated file together.

Formed once, when the engine is created (a collective: every rank gathers
every rank's host and data-parallel group, then creates every writer group's
gloo group in the same order, as torch requires).
"""

import os
import socket
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ds_fastckpt.decisions.shares import RankFacts, writer_groups
from ds_fastckpt.engine import collectives
from ds_fastckpt.engine.rank_group import RankGroup


@dataclass(frozen=True)
class WriterGroup:
    """The ranks writing one copy of a replicated file together; ``members[0]`` is the one DeepSpeed picks."""

    members: Tuple[int, ...]
    ranks: RankGroup  # collectives among the members only, with the commit timeout

    @property
    def index(self) -> int:
        """This rank's place in ``members``; 0 is the leader."""
        return self.members.index(collectives.rank())

    @property
    def is_leader(self) -> bool:
        return self.index == 0


def form_writer_group(mode: str, node_local: bool, data_parallel_ranks: Sequence[int],
                      everyone: RankGroup) -> Optional[WriterGroup]:
    """This rank's writer group, or None when it writes alone or not at all; every rank must call it.

    Args:
        mode: ``parallel_writers``.
        node_local: DeepSpeed's ``checkpoint.use_node_local_storage``.
        data_parallel_ranks: the global ranks of this rank's data-parallel group.
        everyone: the engine's collectives over all ranks.

    Raises:
        CommitError: when a rank does not join within the timeout.
    """
    facts = RankFacts(rank=collectives.rank(), host=socket.gethostname(),
                      local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                      data_parallel_ranks=tuple(data_parallel_ranks))
    gathered = everyone.gather(facts, "parallel_writers could not form its writer groups")
    mine = None
    for members in writer_groups(mode, node_local, gathered):
        group = collectives.bounded_subgroup(list(members), everyone.timeout_s)
        if collectives.rank() in members:
            mine = WriterGroup(members=members, ranks=RankGroup(everyone.timeout_s, group))
    return mine
