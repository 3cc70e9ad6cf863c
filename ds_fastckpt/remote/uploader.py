"""One rank's uploads: the files it wrote of each committed checkpoint, on a thread of their own.

Order per checkpoint (``layout`` names the keys): the report ``uploading``
with the paths about to be sent (so that an interrupted upload is known to be
ours and what it may have left), every file, then the report ``done``. The
leader (``committer``) commits the checkpoint remotely once every rank's
report says ``done``.

Training never waits for this thread: ``submit`` only queues. At most
``max_pending`` checkpoints wait behind the one uploading; when a newer one
arrives the oldest waiting one is skipped with a warning (and a ``skipped``
report), so the remote tier always gets the newest. An outage is waited out
with backoff (``retry``); a file that changed or vanished fails its
checkpoint (a ``failed`` report) and the next one goes on.

Every file of a checkpoint is opened when it is submitted, on the training
thread, and read through that descriptor: a client that deletes the
directory meanwhile (the Hugging Face Trainer's ``save_total_limit``) does
not take the bytes away from the upload. The descriptors close when the
upload ends or is skipped; until then the fd audit counts them as this
thread's (``reading``).

The thread is a daemon, so it never holds up the interpreter's exit beyond
what ``wait`` allows, and it keeps working during ``atexit`` (an executor
would refuse new work there).
"""

import collections
import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, List, Optional, Set, Tuple

from ds_fastckpt.format.manifest import FileRecord
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.client_files import client_file_names, file_digest
from ds_fastckpt.remote.retry import GaveUp, first_line, retry_while_unavailable
from ds_fastckpt.remote.store import ObjectStore, RemoteError

logger = logging.getLogger(__name__)

THREAD_NAME = "ds_fastckpt-upload"


@dataclass
class UploadJob:
    """One checkpoint's files that this rank uploads, read from ``tag_dir``; with ``client_dir`` also the client
    files there (``client_files``), whose records the ``done`` report carries."""

    tag: str
    tag_dir: Path
    records: List[FileRecord]
    client_dir: Optional[Path] = None
    opened: Dict[str, int] = field(default_factory=dict)  # remote path -> descriptor, from ``open``
    client: List[str] = field(default_factory=list)  # the client files' names, from ``open``

    @property
    def paths(self) -> Tuple[str, ...]:
        return tuple(record.path for record in self.records) + tuple(map(layout.client_path, self.client))

    def open(self) -> None:
        """Opens every file to upload (read-only, never through a symlink); on error none stays open.

        Raises:
            OSError: with errno and path.
        """
        try:
            for record in self.records:
                self.opened[record.path] = _open(self.tag_dir / record.path)
            if self.client_dir is not None:
                self.client = client_file_names(self.client_dir)
                for name in self.client:
                    self.opened[layout.client_path(name)] = _open(self.client_dir / name)
        except OSError:
            self.close()
            raise

    def files(self) -> List[Path]:
        """Where the files to upload are (or were: a file open here may have been deleted since)."""
        return [self.tag_dir / record.path for record in self.records] + [self.client_dir / name
                                                                        for name in self.client]

    def source(self, path: str) -> Path:
        """Where the upload reads ``path``: its descriptor, which outlives a deletion of the file."""
        return Path(f"/proc/self/fd/{self.opened[path]}")

    def close(self) -> None:
        for fd in self.opened.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.opened.clear()


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


class Uploader:
    """Uploads the checkpoints ``submit`` hands it, one at a time, newest wins.

    Args:
        store: the remote tier.
        rank: this rank, for its report's key.
        max_pending: checkpoints that may wait behind the one uploading.
    """

    def __init__(self, store: ObjectStore, rank: int, max_pending: int):
        self.store = store
        self.rank = rank
        self.max_pending = max_pending
        self._waiting: Deque[UploadJob] = collections.deque()
        self._final: Deque[Tuple[UploadJob, layout.UploadReport]] = collections.deque()  # reports still to send
        self._running: Optional[UploadJob] = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def submit(self, job: UploadJob) -> None:
        """Opens ``job``'s files and queues it; skips the oldest waiting one beyond ``max_pending``.

        Never blocks on the store. A file that cannot be opened fails the job at once, with an error logged.
        """
        try:
            job.open()
        except OSError as error:
            logger.error("checkpoint %r is not replicated to %s: %s", job.tag, self.store.describe(), error)
            report = layout.UploadReport(layout.FAILED, job.paths, first_line(error))
            with self._changed:
                self._final.append((job, report))
                self._start()
            return
        with self._changed:
            self._waiting.append(job)
            while len(self._waiting) > self.max_pending:
                skipped = self._waiting.popleft()
                skipped.close()
                self._final.append((skipped, layout.UploadReport(layout.SKIPPED)))
                logger.warning("checkpoint %r is not replicated to %s: %d newer checkpoint(s) wait behind the one "
                               "uploading (replicate.max_pending=%d); the newest is replicated instead", skipped.tag,
                               self.store.describe(), len(self._waiting), self.max_pending)
            self._start()

    def _start(self) -> None:
        self._changed.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
            self._thread.start()

    def held_tags(self) -> Set[str]:
        """Tags whose local files this rank still reads (waiting or uploading): rotation keeps them."""
        return {job.tag for job in self._jobs()}

    def reading(self) -> List[Path]:
        """The files this rank holds open to upload: not leaks (the fd audit leaves them out, and only them)."""
        return [path for job in self._jobs() for path in job.files()]

    def unfinished(self) -> List[str]:
        """Tags still waiting or uploading, oldest first."""
        return [job.tag for job in self._jobs()]

    def _jobs(self) -> List[UploadJob]:
        with self._changed:
            return ([self._running] if self._running is not None else []) + list(self._waiting)

    def wait(self, timeout_s: float) -> bool:
        """Waits until nothing waits or uploads, at most ``timeout_s``; returns whether it is so."""
        with self._changed:
            return self._changed.wait_for(lambda: not (self._running or self._waiting or self._final), timeout_s)

    def close(self) -> None:
        """Stops retrying: what is still uploading gives up at its next wait. Uploads nothing more."""
        self._stop.set()
        with self._changed:
            for job in self._waiting:
                job.close()
            self._waiting.clear()
            self._final.clear()
            self._changed.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                while not (self._waiting or self._final or self._stop.is_set()):
                    self._changed.wait()
                if self._stop.is_set():
                    return
                final = self._final.popleft() if self._final else None
                if final is None:
                    self._running = self._waiting.popleft()
            try:
                if final is not None:
                    self._report_once(*final)
                else:
                    self._upload(self._running)
            finally:
                with self._changed:
                    if self._running is not None:
                        self._running.close()
                    self._running = None
                    self._changed.notify_all()

    def _upload(self, job: UploadJob) -> None:
        what = f"replicating checkpoint {job.tag!r} from {job.tag_dir} to {self.store.describe()}"
        try:
            self._report(job, layout.UploadReport(layout.UPLOADING, job.paths), what)
            for record in job.records:
                self._send(job, record.path, record, what)
            sent = []
            for name in job.client:
                size, crc = file_digest(job.opened[layout.client_path(name)])
                sent.append(FileRecord(path=name, bytes=size, crc32c=crc))
                self._send(job, layout.client_path(name), sent[-1], what)
            self._report(job, layout.UploadReport(layout.DONE, job.paths, client_files=tuple(sent)), what)
        except GaveUp as error:
            logger.warning("%s stopped before it finished: %s", what, error)
        except (RemoteError, OSError) as error:
            logger.error("%s failed; the checkpoint stays local only, the next one is replicated: %s", what, error)
            self._report_once(job, layout.UploadReport(layout.FAILED, job.paths, first_line(error)))

    def _send(self, job: UploadJob, path: str, record: FileRecord, what: str) -> None:
        key = layout.file_key(job.tag, path)
        retry_while_unavailable(lambda: self.store.upload_file(job.source(path), key, size=record.bytes,
                                                               crc32c=record.crc32c), what, self._stop)

    def _report(self, job: UploadJob, report: layout.UploadReport, what: str) -> None:
        key = layout.report_key(job.tag, self.rank)
        retry_while_unavailable(lambda: self.store.put_bytes(key, report.to_json()), what, self._stop)

    def _report_once(self, job: UploadJob, report: layout.UploadReport) -> None:
        """Sends a final report without waiting out an outage: the leader gives up on the tag without it too."""
        try:
            self.store.put_bytes(layout.report_key(job.tag, self.rank), report.to_json())
        except RemoteError as error:
            logger.debug("the %s report of %r was not sent: %s", report.state, job.tag, error)
