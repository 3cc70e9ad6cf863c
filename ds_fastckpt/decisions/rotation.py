"""Applies a retention policy to a save_dir: the one routine that chooses what goes and deletes it.

The engine's rotation after a commit, the disk guard's early freeing before
a save, and the CLI's ``ls`` and ``prune`` all go through ``Rotation``:

1. ``choose``: the complete checkpoints the policy (plus ``ProtectedTags``:
   the tags given, the one ``latest`` names, the newest) does not keep, then
   the leftovers that may go (``leftovers``). Pure but for reading ``latest``
   and, without records given, scanning save_dir. ``ls`` and
   ``prune --dry-run`` stop here.
2. ``apply``: ``choose``, then each chosen directory is retired (checked to
   be ours and renamed to its trash name, ``deleter.retire``), save_dir is
   fsynced once, so no checkpoint counts as complete any more after a crash,
   and the retired trees are removed inline or through ``submit``. With
   ``keep_spare`` the newest checkpoint chosen is retired to its spare name
   instead and not removed: the next save writes over its files in place,
   and the rotation after it removes the spare with the leftovers.
3. While a submitted removal runs, ``scan`` leaves its trash directory out,
   and it owns that name (``deleter.hand_over``): retiring the same tag
   again waits for it, so that no one deletes it twice; ``finish_removals``
   waits for all.
"""

import concurrent.futures
import logging
from pathlib import Path
from typing import Callable, Collection, Iterable, List, Optional, Tuple

from ds_fastckpt import storage
from ds_fastckpt.decisions.deleter import UnsafeDeletionError, hand_over, remove_retired, retire
from ds_fastckpt.decisions.leftovers import leftovers_to_delete
from ds_fastckpt.decisions.resume import read_latest
from ds_fastckpt.decisions.retention import AnyOf, ProtectedTags, RetentionContext, RetentionPolicy, unkept
from ds_fastckpt.faults import save_points
from ds_fastckpt.format.atomicity import fsync_dir
from ds_fastckpt.format.records import CheckpointRecord, scan

logger = logging.getLogger(__name__)

# Runs ``function(*args)`` later (on the engine's background writer) and returns its Future.
Submit = Callable[..., concurrent.futures.Future]

DEFAULT_REMOVAL_TIMEOUT_S = 1800.0


def choose(records: Iterable[CheckpointRecord], policy: RetentionPolicy, protected: Iterable[str] = (),
           incoming: int = 0) -> List[CheckpointRecord]:
    """What a rotation deletes: unkept complete checkpoints (oldest commit first), then removable leftovers.

    Pure: the same records always give the same answer, and nothing is read.

    Args:
        records: from ``records.scan``; directories that are not ours or damaged are never chosen.
        policy: what to keep; ``ProtectedTags(protected)`` is added to it, so the newest always stays.
        protected: tags never to delete.
        incoming: checkpoints about to be written that will count toward the policy (see ``RetentionContext``).
    """
    records = list(records)
    keep = AnyOf(policy, ProtectedTags(protected))
    return unkept(records, keep, RetentionContext(incoming)) + leftovers_to_delete(records)


class Rotation:
    """Chooses with one policy and deletes, tracking removals still running in the background.

    Args:
        policy: what to keep, built once (``retention.policy_from_config``).
        removal_timeout_s: how long ``finish_removals`` waits for removals still running.
    """

    def __init__(self, policy: RetentionPolicy, removal_timeout_s: float = DEFAULT_REMOVAL_TIMEOUT_S):
        self.policy = policy
        self._removal_timeout_s = removal_timeout_s
        self._removals: List[Tuple[Path, concurrent.futures.Future]] = []  # (trash dir, its removal)
        # Tags kept whatever the policy says, asked at each choice: the remote tier's uploads still to come.
        self.held: Callable[[], Iterable[str]] = tuple

    def removing(self) -> List[Path]:
        """The retired directories whose removal is still running."""
        return [trash for trash, future in self._removals if not future.done()]

    def scan(self, save_dir) -> List[CheckpointRecord]:
        """``records.scan`` without the retired directories still being removed in the background."""
        removing = {trash.name for trash in self.removing()}
        return [record for record in scan(Path(save_dir)) if record.name not in removing]

    def choose(self, save_dir, records: Optional[List[CheckpointRecord]] = None, protected: Iterable[str] = (),
               incoming: int = 0) -> List[CheckpointRecord]:
        """What ``apply`` would delete now; deletes nothing.

        Args:
            save_dir: the checkpoint directory; the tag its ``latest`` names is protected too, and those ``held``
                names.
            records: its records, when the caller has scanned already (``ls`` lists those not ours too);
                by default ``scan(save_dir)``.
            protected: tags never to delete.
            incoming: checkpoints about to be written that will count toward the policy.
        """
        records = self.scan(save_dir) if records is None else records
        latest = read_latest(Path(save_dir))
        return choose(records, self.policy, {*protected, *self.held(), *filter(None, [latest])}, incoming)

    def apply(self, save_dir, protected: Iterable[str] = (), incoming: int = 0,
              submit: Optional[Submit] = None, keep_spare: bool = False,
              leftovers: Optional[Collection[str]] = None) -> List[CheckpointRecord]:
        """Deletes what ``choose`` chooses; returns those records.

        Every chosen directory is retired first and save_dir fsynced once,
        so a crash at ``mid_rotation`` leaves trash directories, never a
        half-deleted checkpoint that looks complete. Leftovers are retired
        before checkpoints, so a tag's old spare or trash is out of the way
        before that tag is retired again. A directory this process may not
        change (``chmod -R a-w`` to keep a checkpoint) is left where it is,
        complete and loadable, with a warning naming it; a directory that
        cannot be retired or removed is logged and the others still go.

        Args:
            save_dir: the checkpoint directory.
            protected: tags never to delete (the one just committed).
            incoming: checkpoints about to be written that will count toward the policy.
            submit: runs the removals off this thread (the engine's background writer); None removes here.
            keep_spare: keep the newest chosen checkpoint as the spare (``recycle_retired``).
            leftovers: delete only leftovers of these kinds ("trash", "pending", "spare") and no checkpoint.

        Raises:
            UnsafeDeletionError: if a chosen directory is no longer ours, or is a symlink.
            OSError: from rename, fsync or unlink, with errno and path: the first, once the rest is done.
        """
        save_dir = Path(save_dir)
        self._forget_finished()
        chosen = self.choose(save_dir, protected=protected, incoming=incoming)
        if leftovers is not None:
            chosen = [record for record in chosen if record.leftover in leftovers]
        doomed = [record for record in chosen if self._removable(save_dir, record)]
        complete = [record for record in doomed if record.complete]
        spare = complete[-1] if keep_spare and complete else None
        retired, failures = {}, []
        for record in [record for record in doomed if not record.complete] + complete:
            try:
                retired[record.name] = retire(save_dir, record, as_spare=record is spare)
            except (OSError, UnsafeDeletionError) as error:
                failures.append(error)
                logger.warning("rotation could not delete %s from %s: %s", record.name, save_dir, error)
        if retired:
            fsync_dir(save_dir)  # the renames reach the disk before any unlink can
            save_points.reached("mid_rotation")
        for record in doomed:
            trash = retired.get(record.name)
            if trash is None or record is spare:
                continue
            if submit is None:
                try:
                    remove_retired(trash)
                except OSError as error:
                    failures.append(error)
                    logger.warning("rotation could not delete %s (%s); the next rotation retries", trash, error)
            else:
                removal = submit(remove_retired, trash)
                hand_over(trash, removal)  # that removal owns the trash name until it ends
                self._removals.append((trash, removal))
        deleted = [record.name for record in doomed if record.name in retired and record is not spare]
        if deleted:
            logger.info("rotation deleted %s from %s", ", ".join(deleted), save_dir)
        if spare is not None and spare.name in retired:
            logger.info("rotation retired %s in %s; its files stay as the spare the next save writes over",
                        spare.name, save_dir)
        if failures:
            raise failures[0]
        return [record for record in doomed if record.name in retired]

    def make_room(self, save_dir, leftovers: Optional[Collection[str]] = None) -> int:
        """Frees what the policy allows before one more checkpoint is written; returns how many were deleted.

        The incoming checkpoint counts toward the policy (``LatestN(n)``
        keeps ``n - 1`` of the existing ones). Removals still running are
        waited for first, as their space is about to be free, and the new
        ones run here: the caller needs the space before it goes on.

        Args:
            save_dir: the checkpoint directory.
            leftovers: free only leftovers of these kinds ("trash", "pending", "spare"), never a checkpoint;
                the disk guard asks for them before it frees checkpoints (see ``disk_guard``).
        """
        self.finish_removals()
        return len(self.apply(save_dir, incoming=1, leftovers=leftovers))

    @staticmethod
    def _removable(save_dir: Path, record: CheckpointRecord) -> bool:
        """False, with a warning naming it, for a directory this process may not remove: it stays as it is."""
        why = storage.storage_for(save_dir).cannot_remove(save_dir / record.name)
        if why is not None:
            logger.warning("rotation could not delete %s from %s: %s; it stays where it is (make it writable to "
                           "let rotation delete it, or remove it yourself)", record.name, save_dir, why)
        return why is None

    def finish_removals(self) -> None:
        """Waits for the removals still running, so free space and leftovers are what they seem.

        A removal that failed is logged, not raised: its trash directory is
        a leftover the next rotation deletes.
        """
        concurrent.futures.wait([future for _, future in self._removals], timeout=self._removal_timeout_s)
        self._forget_finished()
        for trash, _ in self._removals:  # still tracked, so that no scan offers its directory again
            logger.warning("a rotated checkpoint could not be removed (%s is still being removed after %s s); the "
                           "next rotation retries it", trash, self._removal_timeout_s)

    def _forget_finished(self) -> None:
        """Drops the removals that have ended, logging failures, so the list does not grow over a long run."""
        finished, running = [], []
        for trash, future in self._removals:
            (finished if future.done() else running).append((trash, future))
        self._removals = running
        for _, future in finished:
            failure = "its removal was cancelled" if future.cancelled() else future.exception()
            if failure is not None:
                logger.warning("a rotated checkpoint could not be removed (%s); the next rotation retries it",
                               failure)
