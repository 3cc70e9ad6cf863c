"""The remote tier of one engine: what each rank uploads after a commit, and the leader's remote commit.

Call order: ``Replication(...)`` when the engine is created (the store is
checked there, so a wrong url, endpoint, bucket or credential fails
``deepspeed.initialize``); ``enqueue`` after every local commit, on every
rank, with every rank's records (the commit's all-gather has them); local
rotation asks ``held_tags`` (never delete what is still to be uploaded) and
the fd audit ``reading``; ``wait`` from ``ds_fastckpt.wait_all()`` and at exit.

Each rank uploads the files it wrote (``remote.layout.remote_records`` picks
one rank per path); rank 0 commits remotely (``remote.committer``). Nothing
here blocks training on the store.
"""

import collections
import dataclasses
import json
import logging
import time
import weakref
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, Set, Union

from ds_fastckpt.decisions.retention import policy_from_config
from ds_fastckpt.decisions.rotation import Rotation
from ds_fastckpt.engine.config import ConfigError
from ds_fastckpt.engine.rank_group import RankGroup
from ds_fastckpt.engine.shared_write import FileShare, join_shares
from ds_fastckpt.format.atomicity import atomic_write_bytes
from ds_fastckpt.format.manifest import FileRecord, read_manifest
from ds_fastckpt.format.names import REMOTE_NOTE_NAME
from ds_fastckpt.format.small_files import read_small_file
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.committer import Committer, RemoteCommit
from ds_fastckpt.remote.options import SECTION, ReplicateConfig
from ds_fastckpt.remote.rotation import rotate_remote
from ds_fastckpt.remote.store import ObjectStore, RemoteError
from ds_fastckpt.remote.uploader import Uploader, UploadJob
from ds_fastckpt.remote.url import open_store

logger = logging.getLogger(__name__)

_live: "weakref.WeakSet[Replication]" = weakref.WeakSet()
_client_files_follow = False  # set by expect_client_files()
_READY_KEPT = 8  # save_dirs a client said were ready before their checkpoint was committed (async saves)


def expect_client_files() -> None:
    """From now on, rank 0 uploads each checkpoint with its client files (``remote.client_files``).

    For a client that writes its own files beside the tag directory after
    ``save_checkpoint`` returns (the Hugging Face Trainer) and then calls
    ``client_files_ready(save_dir)``: rank 0's upload of a checkpoint waits
    for that call (or for ``wait``), so the files are complete when sent.
    """
    global _client_files_follow
    _client_files_follow = True


def client_files_ready(save_dir) -> None:
    """Says that the client wrote all its files into ``save_dir``: rank 0 may upload its checkpoint now."""
    for replication in list(_live):
        replication.client_files_ready(Path(save_dir).absolute())


def open_checked_store(options: ReplicateConfig) -> ObjectStore:
    """The store ``options`` name, checked with one request.

    Raises:
        ConfigError: naming the url and endpoint (never a secret) and why it cannot be used.
    """
    try:
        store = open_store(options.url, endpoint_url=options.endpoint_url, part_size=options.part_size,
                           concurrency=options.concurrency, request_timeout_s=options.request_timeout_s)
        store.check_reachable()
    except RemoteError as error:
        raise ConfigError(f"{SECTION}.url={options.url!r} cannot be used: {error}") from None
    return store


class Replication:
    """Uploads this rank's files of every committed checkpoint; on rank 0 also commits them remotely.

    Args:
        options: the ``replicate`` section.
        ranks: the engine's rank group: this rank, and the all-gather that tells each rank what the others hold.
        node_local: each node has its own save_dir (``use_node_local_storage``).
        rotation: the engine's local rotation: from now on it keeps what ``held_tags`` names.
        store: the remote tier, when already open (tests); by default ``open_checked_store(options)``.
    """

    def __init__(self, options: ReplicateConfig, ranks: RankGroup, node_local: bool, rotation: Rotation,
                 store: Optional[ObjectStore] = None):
        self.options = options
        self.store = store or open_checked_store(options)
        self.rank = rank = ranks.rank
        self._ranks = ranks
        self._held_elsewhere: Set[str] = set()  # what the other ranks still read, as of the last enqueue
        self.node_local = node_local
        self.uploader = Uploader(self.store, rank, options.max_pending)
        self._noted: Set[Path] = set()  # save_dirs whose remote note is written
        self._held: Dict[Path, UploadJob] = {}  # save_dir -> rank 0's upload, waiting for client_files_ready
        self._ready: Deque[Path] = collections.deque(maxlen=_READY_KEPT)
        _live.add(self)
        rotation.held = self.held_tags  # never delete what is still to be uploaded
        policy = policy_from_config(options)
        self.committer = None if rank != 0 else Committer(
            self.store, options.max_pending, lambda keep: rotate_remote(self.store, policy, keep))

    def enqueue(self, tag_dir: Path, files: Sequence[Union[FileRecord, FileShare]], save_latest: bool,
                storage_leader: bool) -> None:
        """Queues the upload of a checkpoint just committed locally at ``tag_dir``; returns at once.

        Args:
            tag_dir: the committed checkpoint directory.
            files: every rank's records of it, as the commit gathered them.
            save_latest: whether the save set ``latest``: the remote ``latest`` follows it.
            storage_leader: whether this rank wrote the commit in its save_dir; it notes the remote tier there.
        """
        if storage_leader:
            self._note_remote(tag_dir.parent)
        records = remote_records_of(files, self.node_local)
        mine = [record for record in records if record.rank == self.rank]
        client_dir = tag_dir.parent if _client_files_follow and self.rank == 0 else None
        job = UploadJob(tag_dir.name, tag_dir, mine, client_dir)
        if client_dir is not None and client_dir not in self._ready:
            self._held[client_dir] = job  # the client is still writing there: client_files_ready submits it
        elif mine or client_dir is not None:
            self.uploader.submit(job)
        if self.committer is not None:
            self._commit_remotely(tag_dir, records, save_latest, client_dir is not None)
        self._share_held_tags(tag_dir.name)

    def _commit_remotely(self, tag_dir: Path, records: List[FileRecord], save_latest: bool,
                         with_client: bool) -> None:
        """Rank 0: hands the committer the remote manifest, to write once every uploading rank reports."""
        manifest = read_manifest(tag_dir)  # rank 0 is a storage leader: its own commit just wrote it
        if manifest is None:
            logger.warning("checkpoint %r is not replicated: rank 0 has no manifest of it at %s", tag_dir.name,
                           tag_dir)
            return
        remote = dataclasses.replace(manifest, files=records)
        uploaders = {record.rank for record in records} | ({self.rank} if with_client else set())
        self.committer.submit(RemoteCommit(remote, uploaders, save_latest))

    def _share_held_tags(self, tag: str) -> None:
        """Tells every rank what each still reads (a collective: every rank's ``enqueue`` ends with it).

        A storage leader rotates its save_dir alone, while the other ranks there (each node's, with node-local
        storage) may still upload from it: until the next save, it keeps what they held now, a superset of what
        they will hold then, as held tags only shrink until the next ``enqueue``. Its own it asks live.
        """
        gathered = self._ranks.gather(self.held_tags(own_only=True), f"the uploads of checkpoint {tag!r}")
        self._held_elsewhere = set().union(*(held for rank, held in enumerate(gathered) if rank != self.rank))

    def client_files_ready(self, save_dir: Path) -> None:
        """Submits rank 0's upload held for ``save_dir`` (see ``expect_client_files``), or remembers the call."""
        job = self._held.pop(save_dir, None)
        if job is not None:
            self.uploader.submit(job)
        else:
            self._ready.append(save_dir)

    def _release_held(self) -> None:
        """Submits every held upload as it is: the client is done writing (its last save, or the exit)."""
        while self._held:
            self.uploader.submit(self._held.pop(next(iter(self._held))))

    def _note_remote(self, save_dir: Path) -> None:
        """Writes where the remote tier is into ``save_dir`` (``REMOTE_NOTE_NAME``), for ``ds-fastckpt ls``.

        Only the url and endpoint: never a credential. Written once per save_dir, when it differs.
        """
        if save_dir in self._noted:
            return
        note = json.dumps({"url": self.options.url, "endpoint_url": self.options.endpoint_url}).encode()
        path = save_dir / REMOTE_NOTE_NAME
        try:
            current = read_small_file(path)
        except OSError:
            current = None
        try:
            if current != note:
                atomic_write_bytes(path, note, fsync=False)  # a hint: losing it loses no checkpoint
            self._noted.add(save_dir)
        except OSError as error:
            logger.warning("could not note the remote tier in %s: %s", path, error)

    def held_tags(self, own_only: bool = False) -> Set[str]:
        """Tags the local rotation must keep: still to be uploaded here or, unless ``own_only``, by another rank as
        of the last ``share_held_tags``, or (rank 0) still to be committed remotely."""
        held = self.uploader.held_tags() | {job.tag for job in list(self._held.values())}
        if self.committer is not None:
            held |= self.committer.unsettled()
        return held if own_only else held | self._held_elsewhere

    def reading(self) -> List[Path]:
        return self.uploader.reading()

    def wait(self, timeout_s: Optional[float] = None) -> List[str]:
        """Waits for this rank's uploads (and rank 0's remote commits), at most ``timeout_s`` (default
        ``replicate.wait_timeout_s``); returns the tags still not replicated, after a warning naming them."""
        timeout_s = self.options.wait_timeout_s if timeout_s is None else timeout_s
        self._release_held()
        deadline = time.monotonic() + timeout_s
        self.uploader.wait(timeout_s)
        if self.committer is not None:
            self.committer.wait(max(0.0, deadline - time.monotonic()))
        left = self.unfinished()
        if left:
            logger.warning("checkpoint(s) %s not replicated to %s after waiting %s s; they are complete locally",
                           ", ".join(map(repr, left)), self.store.describe(), timeout_s)
        return left

    def unfinished(self) -> List[str]:
        left = self.uploader.unfinished()
        if self.committer is not None:
            left += [tag for tag in self.committer.unfinished() if tag not in left]
        return left

    def close(self) -> None:
        """Stops uploading; the store's threads stop too unless an upload still uses them (they are daemons)."""
        idle = not self.unfinished()
        self.uploader.close()
        if self.committer is not None:
            self.committer.close()
        if idle:
            self.store.close()


def remote_records_of(files: Sequence[Union[FileRecord, FileShare]], node_local: bool) -> List[FileRecord]:
    """One record per path of the whole checkpoint, shares joined per host, each naming its uploader."""
    if not node_local:
        return layout.remote_records(join_shares(list(files)), node_local)
    by_host: Dict[str, list] = {}
    for record in files:
        by_host.setdefault(record.host, []).append(record)
    return layout.remote_records([joined for host_files in by_host.values() for joined in join_shares(host_files)],
                                 node_local)
