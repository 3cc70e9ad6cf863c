"""Resuming from either tier: the newest complete checkpoint, local or remote, restored locally when needed.

Call order, every rank (``load_checkpoint(dir)`` without a tag):

1. each rank chooses locally (``resume.choose_resume_tag``, as without a
   remote tier) and rank 0 reads the remote catalog; one all-gather shares
   them;
2. the ranks agree on one tag: the newest by commit order
   (``catalog.commit_order``) among what every rank can get: its own
   complete checkpoints and the remote tier's. Where the remote tier is
   unreachable, the local choice stands, with a warning;
3. where the tag is not complete in a rank's save_dir (a replacement node, a
   wiped or damaged disk), the ranks sharing that save_dir (all ranks; the
   ranks of a node with node-local storage) restore it: the storage leader
   makes the pending directory, each rank downloads a share of the files,
   each checked against the remote manifest, and the leader commits them
   with that manifest (``commit.publish_manifest``). Any failure raises on
   every rank, and nothing visible has changed;
4. DeepSpeed loads the tag as any local checkpoint, verified as ``verify`` says.
"""

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Set, Tuple

from ds_fastckpt.decisions.deleter import delete_checkpoint
from ds_fastckpt.decisions.retention import LatestN
from ds_fastckpt.decisions.rotation import Rotation
from ds_fastckpt.engine.commit import SaveInProgress, publish_manifest
from ds_fastckpt.engine.config import local_ranks
from ds_fastckpt.engine.pending import prepare_pending
from ds_fastckpt.engine.rank_group import RankGroup
from ds_fastckpt.format import save_dir_lock
from ds_fastckpt.format.integrity import CheckpointIntegrityError
from ds_fastckpt.format.manifest import Manifest
from ds_fastckpt.format.names import pending_path
from ds_fastckpt.format.records import CheckpointRecord, complete_checkpoints, newest_sequence, scan
from ds_fastckpt.remote.catalog import commit_order, read_catalog
from ds_fastckpt.remote.restore import download_files, share_of
from ds_fastckpt.remote.store import ObjectStore, RemoteUnavailableError

logger = logging.getLogger(__name__)


class _RankView(NamedTuple):
    """What one rank sees, for the all-gather."""

    choice: Optional[Tuple[str, Tuple[int, int]]]  # its local choice and that checkpoint's commit order
    complete: Set[str]  # the complete checkpoints in its save_dir
    error: Optional[str]  # why it could not choose locally (a damaged newest checkpoint)
    remote: Optional[Tuple[str, Manifest]]  # rank 0 only: the remote tier's choice


@dataclasses.dataclass
class TierResume:
    """What a resume across tiers needs of the engine."""

    store: ObjectStore
    ranks: RankGroup
    storage_leader: bool
    node_local: bool
    rotation: Rotation
    lock: save_dir_lock.OneLock
    fsync: bool
    changed: Callable[[Path], None]


def resume_across_tiers(save_dir: Path, choose_locally: Callable[[], Tuple[Optional[str], str]],
                        tiers: TierResume) -> Tuple[Optional[str], str]:
    """The tag ``load_checkpoint(save_dir)`` resumes from and why, restored into ``save_dir`` when only remote.

    Raises:
        CheckpointIntegrityError: the local choice failed (a damaged newest checkpoint) and the remote tier has
            nothing newer to offer.
        CommitError, RemoteError, OSError: a restore that failed on some rank; every rank raises.
    """
    save_dir = Path(save_dir).absolute()
    views = tiers.ranks.gather(_view(save_dir, choose_locally, tiers.ranks.rank == 0, tiers.store),
                               f"choosing the checkpoint to resume in {save_dir}")
    remote = views[0].remote
    tag, reason = _agree(views, remote, save_dir)
    if tag is None:
        errors = [view.error for view in views if view.error]
        if errors:
            raise CheckpointIntegrityError(errors[0])
        return None, reason
    needs = [tag not in view.complete for view in views]
    if any(needs):
        _restore(save_dir, tag, remote[1], tiers, needs)
    return tag, reason


def _view(save_dir: Path, choose_locally, reads_remote: bool, store: ObjectStore) -> _RankView:
    error, choice = None, None
    try:
        tag, _ = choose_locally()
    except CheckpointIntegrityError as damage:
        tag, error = None, str(damage)
    records = {record.tag: record for record in complete_checkpoints(scan(save_dir))} if save_dir.is_dir() else {}
    if tag is not None and tag in records:
        choice = (tag, commit_order(records[tag].manifest))
    remote = None
    if reads_remote:
        try:
            remote = read_catalog(store).resume_choice()
        except RemoteUnavailableError as unavailable:
            logger.warning("resuming from the local tier only: %s", unavailable)
    return _RankView(choice, set(records), error, remote)


def _agree(views: List[_RankView], remote: Optional[Tuple[str, Manifest]], save_dir: Path
           ) -> Tuple[Optional[str], str]:
    """The newest candidate every rank can get, the same on every rank."""
    remote_tags = {remote[0]} if remote is not None else set()
    candidates = {view.choice for view in views if view.choice is not None}
    if remote is not None:
        candidates.add((remote[0], commit_order(remote[1])))
    reachable = [candidate for candidate in candidates
                 if all(candidate[0] in view.complete or candidate[0] in remote_tags for view in views)]
    if not reachable:
        return None, f"neither {save_dir} nor the remote tier holds a complete checkpoint every rank can load"
    tag, _ = max(reachable, key=lambda candidate: (candidate[1], candidate[0] in views[0].complete))
    where = "the remote tier" if any(tag not in view.complete for view in views) else str(save_dir)
    return tag, f"{tag!r} is the newest complete checkpoint in {where}"


def _restore(save_dir: Path, tag: str, manifest: Manifest, tiers: TierResume, needs: List[bool]) -> None:
    """Downloads ``tag`` into every save_dir that lacks it and commits it there; raises on every rank on failure."""
    rank = tiers.ranks.rank
    needed_here = needs[rank]
    save = SaveInProgress(save_dir, tag, pending_path(save_dir, tag), manifest.step, save_latest=True)
    failure = f"restoring checkpoint {tag!r} from {tiers.store.describe()} into {save_dir}"
    tiers.ranks.on_leader(needed_here and tiers.storage_leader,
                          lambda: prepare_pending(save, None, tiers.rotation, tiers.lock), failure)
    index, count = ((int(os.environ.get("LOCAL_RANK", "0")), local_ranks()) if tiers.node_local
                    else (rank, tiers.ranks.world_size))
    tiers.ranks.on_leader(needed_here, lambda: download_files(tiers.store, tag, share_of(manifest, index, count),
                                                              save.pending), failure)
    tiers.ranks.on_leader(needed_here and tiers.storage_leader,
                          lambda: _commit_restored(save, manifest, tiers.fsync, tiers.changed), failure)
    if needed_here and tiers.storage_leader:
        logger.info("restored checkpoint %r from %s into %s", tag, tiers.store.describe(), save_dir)


def restore_alone(store: ObjectStore, save_dir: Path, tag: str, manifest: Manifest, fsync: bool = True) -> None:
    """Restores ``tag`` into ``save_dir`` in this process alone, every file downloaded and checked here.

    For a client that resumes before any engine exists (the Hugging Face
    Trainer's ``get_last_checkpoint``); the same steps as ``_restore``, one rank.

    Raises:
        RemoteError, OSError, InvalidTagError: nothing visible has changed then.
    """
    save_dir = Path(save_dir).absolute()
    save = SaveInProgress(save_dir, tag, pending_path(save_dir, tag), manifest.step, save_latest=True)
    lock = save_dir_lock.OneLock()
    try:
        prepare_pending(save, None, Rotation(LatestN(0)), lock)
        download_files(store, tag, manifest.files, save.pending)
        _commit_restored(save, manifest, fsync, lambda path: None)
    finally:
        lock.release()
    logger.info("restored checkpoint %r from %s into %s", tag, store.describe(), save_dir)


def _commit_restored(save: SaveInProgress, manifest: Manifest, fsync: bool, changed: Callable[[Path], None]) -> None:
    """Commits a downloaded checkpoint with its remote manifest, ordered after every checkpoint already there."""
    local = dataclasses.replace(manifest, client_files=[],
                                sequence=max(manifest.sequence, newest_sequence(scan(save.save_dir)) + 1))
    replaced = publish_manifest(save, local, fsync=fsync, changed=changed)
    if replaced is not None:  # a damaged copy of the same tag was there: it is ours, and now a leftover
        delete_checkpoint(save.save_dir, CheckpointRecord(name=replaced.name, tag=save.tag, leftover="pending"))
