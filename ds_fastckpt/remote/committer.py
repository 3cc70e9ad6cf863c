"""The remote commit, on the leader: once every rank reports its files uploaded, the manifest, then ``latest``.

Order per checkpoint, each step only after the one before succeeded:

1. the reports of every rank that uploads files of it (``layout``) say
   ``done``; each file was checked on the way up (size and CRC-32C of what
   was sent, ``ObjectStore.upload_file``);
2. ``<tag>/ds_fastckpt_manifest.json``: from now on the tag is complete;
3. ``latest``, when the checkpoint set it locally and nothing newer is committed remotely;
4. the reports are deleted, and the remote rotation runs (``remote_rotation``).

A rank reporting ``skipped`` or ``failed`` gives the checkpoint up: no
manifest is ever written for it, and the rotation cleans what it left. So
does a checkpoint that falls ``GIVE_UP_BEHIND`` times ``max_pending + 1``
behind the newest one submitted, so that reports lost in an outage cannot
make the list grow without end.

The leader polls the store for reports on its own daemon thread; training
and the other ranks never wait for it, and no collective is involved, so it
also works after the process group is gone (an exit, accelerate's
``end_training()``).
"""

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Set

from ds_fastckpt.format.manifest import Manifest
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.retry import GaveUp, retry_while_unavailable
from ds_fastckpt.remote.store import ObjectStore, RemoteError

logger = logging.getLogger(__name__)

THREAD_NAME = "ds_fastckpt-remote-commit"
FIRST_POLL_S = 0.05
MAX_POLL_S = 2.0
# Each rank uploads one checkpoint and lets max_pending wait; beyond that it skips. A checkpoint this far behind the
# newest has been skipped or failed everywhere, even if the report saying so was lost.
GIVE_UP_BEHIND = 4


@dataclass
class RemoteCommit:
    """A checkpoint committed locally whose remote commit waits for the ranks' reports."""

    manifest: Manifest
    uploaders: Set[int]
    save_latest: bool
    submitted: float = field(default_factory=time.monotonic)
    reports: Dict[int, layout.UploadReport] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return self.manifest.tag


class Committer:
    """Commits checkpoints remotely as their reports arrive, oldest first, on the leader only.

    Args:
        store: the remote tier.
        max_pending: ``replicate.max_pending``: how far a checkpoint may fall behind before it is given up.
        rotate: the remote rotation, called after each commit with the tags it must keep.
    """

    def __init__(self, store: ObjectStore, max_pending: int, rotate: Callable[[Set[str]], None]):
        self.store = store
        self.max_pending = max_pending
        self._rotate = rotate
        self._outstanding: Deque[RemoteCommit] = collections.deque()
        self._committed: Optional[Manifest] = None  # the newest this job committed remotely
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def newest_committed(self) -> Optional[str]:
        return None if self._committed is None else self._committed.tag

    def submit(self, commit: RemoteCommit) -> None:
        """Waits for ``commit``'s reports from now on; never blocks on the store."""
        with self._changed:
            self._outstanding.append(commit)
            while len(self._outstanding) > GIVE_UP_BEHIND * (self.max_pending + 1):
                self._give_up(self._outstanding.popleft(), "newer checkpoints were saved while it waited")
            self._changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()

    def unsettled(self) -> Set[str]:
        """The newest ``max_pending + 1`` tags whose remote commit is still to come: what another rank may still be
        uploading (each rank uploads one and lets ``max_pending`` wait; an older one it has skipped)."""
        with self._changed:
            return {commit.tag for commit in list(self._outstanding)[-(self.max_pending + 1):]}

    def unfinished(self) -> List[str]:
        with self._changed:
            return [commit.tag for commit in self._outstanding]

    def wait(self, timeout_s: float) -> bool:
        """Waits until no commit is outstanding, at most ``timeout_s``; returns whether it is so."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._outstanding, timeout_s)

    def close(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    def _run(self) -> None:
        poll = FIRST_POLL_S
        while not self._stop.is_set():
            with self._changed:
                while not self._outstanding and not self._stop.is_set():
                    self._changed.wait()
                    poll = FIRST_POLL_S
                commits = list(self._outstanding)
            try:
                progressed = any([self._advance(commit) for commit in commits])
            except GaveUp:
                return
            except RemoteError as error:
                logger.error("the remote commit of %s failed (retried after the next save): %s",
                             self.store.describe(), error)
                progressed = False
            poll = FIRST_POLL_S if progressed else min(poll * 2, MAX_POLL_S)
            self._stop.wait(poll)

    def _advance(self, commit: RemoteCommit) -> bool:
        """Reads ``commit``'s new reports; commits or gives it up when they allow. Returns whether it settled."""
        what = f"committing checkpoint {commit.tag!r} to {self.store.describe()}"
        for key in retry_while_unavailable(lambda: self.store.list_keys(layout.report_prefix(commit.tag)), what,
                                           self._stop):
            rank = layout.rank_of_report(key.key, commit.tag)
            if rank is None or rank not in commit.uploaders or rank in commit.reports:
                continue
            raw = retry_while_unavailable(lambda: self.store.get_bytes(key.key, layout.REPORT_LIMIT), what, self._stop)
            report = None if raw is None else layout.parse_report(raw)
            if report is not None and report.state in layout.FINAL_STATES:
                commit.reports[rank] = report
        given_up = [f"rank {rank} {report.state} {report.reason}".strip() for rank, report in commit.reports.items()
                    if report.state != layout.DONE]
        if given_up:
            with self._changed:
                self._settle(commit)
                self._give_up(commit, "; ".join(given_up))
            return True
        if set(commit.reports) != commit.uploaders:
            return False
        self._commit(commit, what)
        return True

    def _commit(self, commit: RemoteCommit, what: str) -> None:
        client_files = [record for report in commit.reports.values() for record in report.client_files]
        manifest = dataclasses.replace(commit.manifest, client_files=sorted(client_files, key=lambda r: r.path))
        retry_while_unavailable(lambda: self.store.put_bytes(layout.manifest_key(commit.tag), manifest.to_json()),
                                what, self._stop)
        newest = self._committed is None or manifest.sequence >= self._committed.sequence
        if commit.save_latest and newest:
            retry_while_unavailable(lambda: self.store.put_bytes(layout.latest_key(), commit.tag.encode()), what,
                                    self._stop)
        if newest:
            self._committed = manifest
        logger.info("checkpoint %r is replicated to %s (%.1f s after its local commit)", commit.tag,
                    self.store.describe(), time.monotonic() - commit.submitted)
        try:  # settled only after the rotation: wait() returning means the remote tier is as it will stay
            self.store.delete([layout.report_key(commit.tag, rank) for rank in commit.uploaders])
            with self._changed:
                keep = {other.tag for other in self._outstanding}
            self._rotate(keep)
        except RemoteError as error:  # committed; the next rotation cleans up
            logger.warning("checkpoint %r is replicated, but cleaning %s up failed: %s", commit.tag,
                           self.store.describe(), error)
        finally:
            with self._changed:
                self._settle(commit)

    def _settle(self, commit: RemoteCommit) -> None:
        if commit in self._outstanding:
            self._outstanding.remove(commit)
            self._changed.notify_all()

    def _give_up(self, commit: RemoteCommit, why: str) -> None:
        logger.warning("checkpoint %r is not replicated to %s (%s); it stays local only and the next rotation there "
                       "removes what its upload left", commit.tag, self.store.describe(), why)
        self._changed.notify_all()
