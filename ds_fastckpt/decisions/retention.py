"""Which complete checkpoints to keep: small retention policies, each one decision, combined. No I/O.

Modelled on Orbax's ``preservation_policy``: a policy is a frozen value
object with one method, ``should_keep(checkpoints, context)``, which gets the
complete checkpoints oldest commit first and returns the names of those it
keeps. A checkpoint goes when no policy of the combination keeps it
(``AnyOf``). Leftovers of interrupted saves and deletions are not a
policy's business (see ``leftovers``), nor is deleting (see ``rotation``).

Adding a policy ("keep the best metric", "one per hour") takes one class
here with a ``from_options`` class method, its name in ``CONFIGURED``, and
one field in ``engine.config.FastAioConfig``; no caller changes.
"""

import abc
from dataclasses import dataclass, field
from typing import FrozenSet, Iterable, List, Optional, Sequence, Tuple

from ds_fastckpt.format.records import CheckpointRecord, complete_checkpoints


@dataclass(frozen=True)
class RetentionContext:
    """What a decision may depend on beyond the checkpoints themselves.

    Attributes:
        incoming: checkpoints about to be written that will count as the newest ones: 1 when freeing
            space for the next save before it starts, 0 when rotating after a commit.
    """

    incoming: int = 0

    def __post_init__(self):
        if self.incoming < 0:
            raise ValueError(f"incoming={self.incoming} is not allowed: use an integer >= 0")


class RetentionPolicy(abc.ABC):
    """One reason to keep checkpoints."""

    @abc.abstractmethod
    def should_keep(self, checkpoints: Sequence[CheckpointRecord], context: RetentionContext) -> FrozenSet[str]:
        """The names of the checkpoints this policy keeps.

        Args:
            checkpoints: complete checkpoints, oldest commit first (``records.complete_checkpoints``).
            context: what else the decision may depend on.
        """

    @classmethod
    def from_options(cls, options) -> Optional["RetentionPolicy"]:
        """This policy as the engine's options configure it, or None when they turn it off.

        Args:
            options: a ``FastAioConfig`` (or any object with its retention fields).
        """
        return None


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed: use an integer >= 0")
    return value


@dataclass(frozen=True)
class LatestN(RetentionPolicy):
    """Keeps the newest ``n`` by commit order, counting ``context.incoming`` among them; ``n`` 0 keeps all."""

    n: int

    def __post_init__(self):
        _count("keep_last", self.n)

    def should_keep(self, checkpoints, context):
        if self.n == 0:
            return frozenset(record.name for record in checkpoints)
        existing = self.n - context.incoming  # the incoming ones take the newest places
        return frozenset(record.name for record in checkpoints[-existing:]) if existing > 0 else frozenset()

    @classmethod
    def from_options(cls, options):
        return cls(options.keep_last)


@dataclass(frozen=True)
class EveryNSteps(RetentionPolicy):
    """Keeps checkpoints whose manifest step is a multiple of ``n`` (milestones); ``n`` 0 keeps none."""

    n: int

    def __post_init__(self):
        _count("keep_every", self.n)

    def should_keep(self, checkpoints, context):
        if self.n == 0:
            return frozenset()
        return frozenset(record.name for record in checkpoints
                         if record.manifest.step is not None and record.manifest.step % self.n == 0)

    @classmethod
    def from_options(cls, options):
        return cls(options.keep_every) if options.keep_every else None


@dataclass(frozen=True)
class ProtectedTags(RetentionPolicy):
    """Keeps the named tags (the one just committed, the one ``latest`` names) and always the newest checkpoint.

    The newest complete checkpoint is what a resume loads when ``latest`` is
    broken: no policy combined with this one can leave a save_dir without it.
    """

    tags: FrozenSet[str] = field(default_factory=frozenset)

    def __post_init__(self):
        object.__setattr__(self, "tags", frozenset(self.tags))  # any iterable in, a hashable value kept

    def should_keep(self, checkpoints, context):
        named = {record.name for record in checkpoints if record.tag in self.tags}
        return frozenset(named | ({checkpoints[-1].name} if checkpoints else set()))


@dataclass(frozen=True, init=False)
class AnyOf(RetentionPolicy):
    """Keeps what any of ``policies`` keeps; with none, keeps nothing."""

    policies: Tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy):
        object.__setattr__(self, "policies", tuple(policies))

    def should_keep(self, checkpoints, context):
        return frozenset().union(*(policy.should_keep(checkpoints, context) for policy in self.policies))


# The policies the engine's options configure, in the order they are combined.
CONFIGURED = (LatestN, EveryNSteps)


def policy_from_config(options) -> RetentionPolicy:
    """The combination of the configured policies: build it once, apply it at every rotation.

    Args:
        options: a ``FastAioConfig`` (or any object with its retention fields: ``keep_last``, ``keep_every``).

    Raises:
        ValueError: for a value a policy does not allow, naming it.
    """
    return AnyOf(*filter(None, (policy.from_options(options) for policy in CONFIGURED)))


def unkept(records: Iterable[CheckpointRecord], policy: RetentionPolicy,
           context: RetentionContext = RetentionContext()) -> List[CheckpointRecord]:
    """The complete checkpoints among ``records`` that ``policy`` does not keep, oldest commit first."""
    checkpoints = complete_checkpoints(list(records))
    kept = policy.should_keep(checkpoints, context)
    return [record for record in checkpoints if record.name not in kept]
