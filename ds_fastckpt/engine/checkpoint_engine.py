"""The ``fast_aio`` checkpoint engine: DeepSpeed's engine protocol over AioFileWriter, with atomic commit."""

import atexit
import logging
import os
import socket
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from ds_fastckpt._version import __version__
from ds_fastckpt.decisions.deleter import delete_checkpoint, remove_retired, retire
from ds_fastckpt.decisions.disk_guard import ensure_space
from ds_fastckpt.decisions.fd_audit import FdLeakError, leak_message, leaked_fds
from ds_fastckpt.decisions.resume import choose_resume_tag, read_latest
from ds_fastckpt.decisions.retention import checkpoints_to_delete
from ds_fastckpt.engine import collectives
from ds_fastckpt.engine.background import BackgroundWriter, snapshot, wait_for
from ds_fastckpt.engine.config import FastAioConfig
from ds_fastckpt.engine.verified_load import VerifiedLoader
from ds_fastckpt.faults import save_points
from ds_fastckpt.format import save_dir_lock
from ds_fastckpt.format.atomicity import atomic_write_bytes, fsync_dir, publish_dir, undo_publish
from ds_fastckpt.format.manifest import FileRecord, Manifest, write_manifest, write_pending_marker
from ds_fastckpt.format.names import LATEST_NAME, PENDING_MARKER_NAME, pending_path
from ds_fastckpt.format.records import CheckpointRecord, newest_sequence, scan
from ds_fastckpt.format.small_files import UnsafeSmallFileError, read_small_file
from ds_fastckpt.format.tags import InvalidTagError, validate_tag
from ds_fastckpt.native.op import load_op
from ds_fastckpt.native.staging import StagingBuffer
from ds_fastckpt.native.writer import AioFileWriter, torch_zip_crc32

logger = logging.getLogger(__name__)

ENGINE_NAME = "FastAioCheckpointEngine"


class CommitError(RuntimeError):
    """A save could not be committed; the previous complete checkpoint is untouched."""


@dataclass
class _SaveInProgress:
    save_dir: Path
    tag: str
    pending: Path
    step: Optional[int]
    save_latest: bool
    files: List[FileRecord] = field(default_factory=list)
    pending_writes: list = field(default_factory=list)  # Futures of FileRecord or None, async mode only
    failed: Optional[BaseException] = None  # this rank's first error in this save: it is never committed

    def redirect(self, path) -> Optional[Path]:
        """Where a path inside ``save_dir/tag`` is written while the save is pending, or None."""
        final = self.save_dir / self.tag
        try:
            relative = Path(path).absolute().relative_to(final)
        except ValueError:
            return None
        return self.pending / relative


class FastAioCheckpointEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine writing through libaio + O_DIRECT, committing atomically, rotating safely.

    Call order for one ``engine.save_checkpoint(save_dir, tag)``; every rank
    makes every call:

    1. ``create(info)``: the storage leader (rank 0, or local rank 0 of each
       node with ``use_node_local_storage``) checks free space, cleans a
       leftover of the same tag, and makes the pending directory
       ``save_dir/.<tag>.ds_fastckpt-tmp``. Ends with a collective, so no rank
       writes before it exists. Nothing visible to a loader has changed.
    2. ``makedirs(path)`` / ``save(state_dict, path)``, any number of times:
       paths inside ``save_dir/<tag>`` are written into the pending directory.
       Each file is durable (fsynced) when ``save`` returns, and its size and
       CRC-32C are recorded. Still nothing visible has changed. A write that
       fails is not raised here but held for the commit, so that this rank
       still joins it and no other rank waits for it.
    3. ``commit(info)``: all ranks' file records and errors are gathered (a
       barrier). If any rank failed, every rank raises: that rank its own
       error, the others ``CommitError``. Otherwise the leader fsyncs the
       pending directories, writes the manifest atomically, renames the
       pending directory to ``save_dir/<tag>`` (an atomic exchange when the
       tag existed), fsyncs ``save_dir`` and writes ``latest`` atomically;
       if one of these fails after the rename, the rename and ``latest`` are
       undone before it raises. Then it rotates; a failure there is logged,
       as the checkpoint is committed. Every rank then audits its
       descriptors into save_dir (and to deleted files wherever it saved
       before), and the ranks share the result.

    Only ``save_checkpoint`` (through the hook's ``prepare_save``) starts a
    checkpoint. Any other ``create``/``save``/``commit`` sequence, such as
    DeepSpeed's ``save_16bit_model``, writes its files durably where it asks
    and commits nothing: no manifest, rename, ``latest`` or rotation.

    The collectives of steps 1 and 3 run on a gloo group of their own that
    gives up after ``commit_timeout_s``: a rank that died or hangs costs the
    others a bounded wait and a ``CommitError``, never a hang.

    With ``"async": true`` the engine is decoupled (``is_decoupled()``):
    ``save`` queues the file for the ``ds_fastckpt-writer`` thread and returns,
    so nothing is durable when ``save_checkpoint`` returns. DeepSpeed calls
    ``get_commit_info`` and ``commit`` at the next gradient-accumulation
    boundary, before the optimizer step changes any tensor; ``commit`` waits
    for the writes and then does step 3 exactly as above. A second
    ``save_checkpoint`` first commits the one in flight; ``cleanup`` (from
    ``engine.destroy()``), ``wait()`` and interpreter exit commit it too.

    ``load(path)`` reads the file with O_DIRECT, verifies it against its
    manifest as ``verify`` says and deserializes it from memory (see
    ``verified_load``); it works on torch >= 2.6.

    Args:
        config_params: DeepSpeed's config object.
        options: the validated ``checkpoint.fast_aio`` section.
        tuning: ``block_size`` and ``queue_depth`` from DeepSpeed's ``aio`` section.
        node_local: DeepSpeed's ``checkpoint.use_node_local_storage``.
    """

    def __init__(self, config_params, options: FastAioConfig, tuning: Dict[str, int], node_local: bool = False):
        super().__init__(config_params)
        self.name = ENGINE_NAME
        self.options = options
        self.tuning = tuning
        self.node_local = node_local
        self._host = socket.gethostname()
        self._staging: Optional[StagingBuffer] = None
        self._save: Optional[_SaveInProgress] = None
        self._next_step: Optional[int] = None
        self._next_save_latest = True
        self._loader = VerifiedLoader(options, tuning, self._gather, node_local=node_local)
        self._background: Optional[BackgroundWriter] = None
        self._removals: list = []  # (trash path, Future) of removals running on the background writer
        self._locked_dir: Optional[Path] = None  # the save_dir whose lock this engine holds: one at a time
        self._saved_dirs: Set[str] = set()  # every save_dir saved into, resolved, for the fd audit
        self._checkpoint_save_next = False  # set by save_checkpoint: the next create() starts a checkpoint
        self._file_save = False  # between create() and commit() of a save that is not a checkpoint
        self._failed_pending: Optional[Path] = None  # pending dir of a save that failed, removed at the next
        load_op()  # build or load the op now, not in the middle of the first save
        self._staging_buffer()  # allocate (and pin) the staging halves now: a failure surfaces at initialize
        self._group = collectives.bounded_group(options.commit_timeout_s)
        _live_engines.add(self)
        if options.async_save:
            self._background = BackgroundWriter()
            _commit_at_exit(self)

    def prepare_save(self, step: Optional[int], save_latest: bool) -> None:
        """Called by the ``save_checkpoint`` hook: the step for the manifest and whether to write ``latest``.

        DeepSpeed itself writes ``latest`` with a plain ``open('w')`` after
        ``commit``; the hook tells DeepSpeed not to and this engine writes it
        atomically instead.
        """
        self._next_step = step
        self._next_save_latest = save_latest
        self._checkpoint_save_next = True
        self._file_save = False

    def is_storage_leader(self) -> bool:
        if self.node_local:
            return int(os.environ.get("LOCAL_RANK", "0")) == 0
        return collectives.rank() == 0

    def is_decoupled(self):
        return self.options.async_save

    def get_commit_info(self):
        save = self._save
        if save is None:
            return None
        # save_latest=False: DeepSpeed would write `latest` with a plain open(); commit() writes it atomically.
        return CheckpointCommitInfo(tag=save.tag, save_dir=str(save.save_dir), save_latest=False)

    def wait(self) -> None:
        """Finishes and commits the checkpoint in flight, if any. Every rank must call it."""
        if self._save is not None:
            self.commit(self.get_commit_info())

    def cleanup(self):
        self.wait()
        self._finish_removals()
        if self._background is not None:
            self._background.shutdown()
            self._background = None
        self._release_lock()

    def save_aborted(self, error: BaseException) -> None:
        """Called when DeepSpeed's ``save_checkpoint`` raised: the checkpoint it was writing is never committed."""
        self._checkpoint_save_next = False  # it may have raised before create()
        if self._save is not None and self._save.failed is None:
            self._save.failed = error

    def create(self, info: CheckpointCommitInfo):
        if not self._checkpoint_save_next:
            # Not from save_checkpoint: DeepSpeed's save_16bit_model brackets its one file with create/commit
            # under the current step's tag. Those files are written as they are; no checkpoint is touched.
            self._file_save = True
            return
        self._checkpoint_save_next = False
        if self._save is not None and self._save.failed is not None and not self.is_decoupled():
            # save_checkpoint raised before commit on this rank; async saves report it at their commit instead
            logger.warning("checkpoint %r failed while saving (%s) and was not committed; removing its pending "
                           "directory", self._save.tag, self._save.failed)
            self._failed_pending, self._save = self._save.pending, None
        self.wait()  # at most one checkpoint in flight
        abandoned, self._failed_pending = self._failed_pending, None
        tag = validate_tag(info.tag)
        save_dir = Path(info.save_dir).absolute()
        save = _SaveInProgress(save_dir, tag, pending_path(save_dir, tag), self._next_step, self._next_save_latest)
        self._next_step, self._next_save_latest = None, True
        self._on_leader(lambda: self._prepare_pending(save, abandoned), f"checkpoint {tag!r} cannot start")
        self._save = save

    def makedirs(self, path, exist_ok=False):
        target = self._save.redirect(path) if self._save is not None else None
        os.makedirs(target or path, exist_ok=True if target else exist_ok)

    def save(self, state_dict, path: str):
        save = self._save
        if save is None or self._file_save:  # outside save_checkpoint: a plain durable write, nothing to commit
            if self._background is None:
                self._write_file(state_dict, Path(path), None)
            else:  # the writer thread owns the staging buffer; this file waits behind the checkpoint in flight
                self._background.submit(self._write_file, state_dict, Path(path), None).result()
            return
        if save.failed is not None:
            return  # this checkpoint already failed on this rank; writing more of it is wasted
        target = save.redirect(path) or Path(path)
        try:
            if self._background is None:
                record = self._write_file(state_dict, target, save)
                if record is not None:  # None for a path outside the checkpoint directory
                    save.files.append(record)
                return
            if self.options.snapshot:
                with torch_zip_crc32(self.options.torch_crc32):
                    state_dict = snapshot(state_dict)
            save.pending_writes.append(self._background.submit(self._write_file, state_dict, target, save))
        except Exception as error:  # commit() raises it, once every rank has heard, so that none waits for us
            save.failed = error
            logger.error("writing %s failed; checkpoint %r will not be committed: %s", target, save.tag, error)

    def _write_file(self, payload, path: Path, save: Optional[_SaveInProgress]) -> Optional[FileRecord]:
        """Writes one file durably: a state dict through torch.save, or bytes serialized earlier."""
        with torch_zip_crc32(self.options.torch_crc32), \
                AioFileWriter(path, staging=self._staging_buffer(), fsync=self.options.fsync,
                              **self.tuning) as writer:
            if isinstance(payload, bytes):
                writer.write(payload)
            else:
                torch.save(payload, writer)
            save_points.reached("before_file_close")
        save_points.reached("after_file_write")
        if save is None or not path.is_relative_to(save.pending):
            return None
        return FileRecord(path=path.relative_to(save.pending).as_posix(), bytes=writer.bytes_written,
                          crc32c=writer.checksum, rank=collectives.rank(), host=self._host)

    def load(self, path: str, map_location=None):
        return self._loader.load(Path(path), map_location=map_location)

    def commit(self, info: CheckpointCommitInfo):
        if self._file_save:
            self._file_save = False
            return True
        save, self._save = self._save, None
        if save is None:
            return True
        written, failure = wait_for(save.pending_writes, self.options.async_timeout_s, f"checkpoint {save.tag!r}")
        failure = save.failed or failure
        mine = save.files + [record for record in written if record is not None]
        report = None if failure is None else f"rank {collectives.rank()}: {type(failure).__name__}: {failure}"
        not_committed = f"checkpoint {save.tag!r} was not committed"
        self._failed_pending = save.pending  # until it is published, the next save removes it
        gathered = self._gather((mine, report), not_committed)
        reports = [rank_report for _, rank_report in gathered if rank_report]
        if failure is not None:
            raise failure
        if reports:
            raise CommitError(f"{not_committed}: {reports[0]}")
        files = [record for rank_files, _ in gathered for record in rank_files]
        self._on_leader(lambda: self._publish(save, files), not_committed)
        self._failed_pending = None
        self._audit_fds(save)
        return True

    def _audit_fds(self, save: _SaveInProgress) -> None:
        """Every rank lists its descriptors into save_dir, and to deleted files wherever it saved before.

        The ranks share what they found, so a leak on one rank fails the save's
        return on every rank (the checkpoint stays committed) instead of
        leaving the others waiting for it in DeepSpeed's next collective.
        """
        self._saved_dirs.add(os.path.realpath(save.save_dir))
        if self.options.fd_audit == "off":
            return
        found = leaked_fds(save.save_dir, removing=[trash for trash, future in self._removals if not future.done()],
                           expected=save_dir_lock.held_lock_files(), earlier_dirs=self._saved_dirs)
        when = f"the save of {save.tag!r} and its rotation"
        mine = f"rank {collectives.rank()}: {leak_message(save.save_dir, when, found)}" if found else None
        reports = [report for report in self._gather(mine, f"the fd audit of {save.tag!r}") if report]
        if not reports:
            return
        if self.options.fd_audit == "raise":
            raise FdLeakError("; ".join(reports))
        if mine is not None:
            logger.warning(mine)

    def verify_before_load(self, tag_dir: Path) -> None:
        """Checks the files of a manifest-carrying tag dir before DeepSpeed loads it, as ``verify`` says."""
        self._loader.verify_before_load(tag_dir)

    def resume_tag(self, save_dir: Path) -> Tuple[Optional[str], str]:
        """The tag ``load_checkpoint(save_dir)`` resumes from, and why. Every rank must call it.

        With ``skip_damaged_on_resume`` the checkpoints are checked newest
        first and damaged ones are skipped; see ``resume.choose_resume_tag``.
        """
        if not self.options.skip_damaged_on_resume:
            return choose_resume_tag(save_dir)

        def damage_of(record: CheckpointRecord) -> Optional[str]:
            return self._loader.damage_of(save_dir.absolute() / record.name, record.manifest)

        return choose_resume_tag(save_dir, damage_of)

    def rotate(self, save_dir: Path, protected=()) -> List[CheckpointRecord]:
        """Deletes what the preservation policy chooses; returns what was deleted.

        Chosen directories are retired (renamed to their trash name) at once.
        In async mode their files are then removed on the background writer,
        off the training thread; otherwise here.
        """
        protected = {*protected, *filter(None, [read_latest(save_dir)])}
        doomed = checkpoints_to_delete(self._scan_settled(save_dir), self.options.keep_last, self.options.keep_every,
                                       protected)
        retired = [retire(save_dir, record) for record in doomed]
        if retired:
            fsync_dir(save_dir)
            save_points.reached("mid_rotation")
        for trash in retired:
            if self._background is None:
                remove_retired(trash)
            else:
                self._removals.append((trash, self._background.submit(remove_retired, trash)))
        if doomed:
            logger.info("rotation deleted %s from %s", ", ".join(record.name for record in doomed), save_dir)
        return doomed

    def _on_leader(self, action, failure: str) -> None:
        """Runs ``action`` on the storage leader; if it fails, every rank raises instead of waiting forever."""
        error = None
        if self.is_storage_leader():
            try:
                action()
            except Exception as caught:  # re-raised below, after every rank has heard of it
                error = caught
        report = None if error is None else f"{type(error).__name__}: {error}"
        reports = [message for message in self._gather(report, failure) if message]
        if error is not None:
            raise error
        if reports:
            raise CommitError(f"{failure}: {reports[0]}")

    def _gather(self, obj, failure: str) -> list:
        """``obj`` from every rank; a rank that does not join within ``commit_timeout_s`` fails the save."""
        try:
            return collectives.all_gather_object(obj, self._group)
        except collectives.CollectiveError as error:
            raise CommitError(f"{failure}: not every rank joined within commit_timeout_s="
                              f"{self.options.commit_timeout_s} s (a rank died, hung or failed outside the "
                              f"checkpoint engine); restart the job to resume from the last complete checkpoint: "
                              f"{error}") from error

    def _scan_settled(self, save_dir: Path) -> List[CheckpointRecord]:
        """``scan`` without the retired directories the background writer is still removing."""
        removing = {trash.name for trash, future in self._removals if not future.done()}
        return [record for record in scan(save_dir) if record.name not in removing]

    def _finish_removals(self) -> None:
        """Waits for background trash removals, so free space and leftovers are what they seem."""
        removals, self._removals = self._removals, []
        _, failure = wait_for([future for _, future in removals], self.options.async_timeout_s,
                              "removing rotated checkpoints")
        if failure is not None:
            logger.warning("a rotated checkpoint could not be removed (%s); the next rotation retries it", failure)

    def _prepare_pending(self, save: _SaveInProgress, abandoned: Optional[Path]) -> None:
        """Leader: lock save_dir, refuse a tag naming what is not ours, drop leftovers, check space, make pending.

        ``abandoned`` is the pending directory of this job's previous save, which failed: no rank
        writes there any more, and its partial files may hold the space the new save needs.
        """
        save.save_dir.mkdir(parents=True, exist_ok=True)
        self._lock(save.save_dir)
        records = self._scan_settled(save.save_dir)
        final = save.save_dir / save.tag
        if os.path.lexists(final) and save.tag not in {record.name for record in records if record.complete}:
            raise InvalidTagError(f"checkpoint tag {save.tag!r} cannot be saved: {final} exists and is not a "
                                  "complete ds_fastckpt checkpoint (a file, a link, or a directory this engine did "
                                  "not write), and it is never replaced or deleted: choose another tag or move it")
        stale = [record for record in records if record.name in (save.pending.name, getattr(abandoned, "name", None))]
        for record in stale:
            delete_checkpoint(save.save_dir, record)
        records = [record for record in records if record not in stale]
        ensure_space(save.save_dir, records, lambda: self._free_early(save.save_dir))
        save.pending.mkdir()
        # Not fsynced: if a crash loses the pending directory or its marker, no checkpoint is lost.
        write_pending_marker(save.pending, save.tag, newest_sequence(records), fsync=False)

    def _lock(self, save_dir: Path) -> None:
        """Holds the lock of ``save_dir`` and of no other directory, re-checked at every save."""
        if self._locked_dir == save_dir:
            save_dir_lock.recheck(save_dir)
            return
        self._release_lock()
        save_dir_lock.acquire(save_dir)
        self._locked_dir = save_dir

    def _release_lock(self) -> None:
        if self._locked_dir is not None:
            save_dir_lock.release(self._locked_dir)
            self._locked_dir = None

    def _free_early(self, save_dir: Path) -> int:
        self._finish_removals()  # space that background removals are about to free
        # The new checkpoint will count toward keep_last, so keep one fewer of the old ones.
        keep = self.options.keep_last - 1 if self.options.keep_last > 1 else 0
        protected = filter(None, [read_latest(save_dir)])
        doomed = checkpoints_to_delete(scan(save_dir), keep, self.options.keep_every, protected)
        for record in doomed:
            delete_checkpoint(save_dir, record)
        return len(doomed)

    def _publish(self, save: _SaveInProgress, files: List[FileRecord]) -> None:
        if self.node_local:
            files = [record for record in files if record.host == self._host]
        manifest = Manifest(tag=save.tag, step=save.step, sequence=newest_sequence(scan(save.save_dir)) + 1,
                            committed_unix_ns=time.time_ns(), world_size=collectives.world_size(),
                            deepspeed_version=deepspeed.__version__, ds_fastckpt_version=__version__,
                            files=sorted(files, key=lambda record: record.path))
        os.unlink(save.pending / PENDING_MARKER_NAME)
        if self.options.fsync:
            for directory, _, _ in os.walk(save.pending):
                fsync_dir(Path(directory))
        save_points.reached("before_commit_record")
        write_manifest(save.pending, manifest, fsync=self.options.fsync)
        save_points.reached("before_publish")
        final = save.save_dir / save.tag
        latest = save.save_dir / LATEST_NAME
        previous_latest = _read_if_exists(latest) if save.save_latest else None
        replaced = publish_dir(save.pending, final, fsync=self.options.fsync)
        self._loader.forget(final)
        save_points.reached("before_latest")
        if save.save_latest:
            self._write_latest(save, final, replaced, previous_latest)
        # Committed. What follows only frees space: a failure there is logged and retried by the next save.
        try:
            if replaced is not None:
                old_copy = CheckpointRecord(name=replaced.name, tag=save.tag, leftover="pending")
                delete_checkpoint(save.save_dir, old_copy)
            self.rotate(save.save_dir, protected={save.tag})
        except OSError as error:
            logger.error("checkpoint %r is committed, but removing old checkpoints failed (the next save retries): "
                         "%s", save.tag, error)

    def _write_latest(self, save: _SaveInProgress, final: Path, replaced: Optional[Path],
                      previous: Optional[bytes]) -> None:
        """Points ``latest`` at the new tag; if that fails, undoes the publication and ``latest``, and raises."""
        latest = save.save_dir / LATEST_NAME
        try:
            atomic_write_bytes(latest, save.tag.encode(), fsync=self.options.fsync)
        except OSError:
            undo_publish(save.pending, final, exchanged=replaced is not None)
            self._loader.forget(final)
            try:
                if previous is None:
                    latest.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(latest, previous, fsync=False)
            except OSError as error:
                logger.error("could not restore %s after the commit of %r failed: %s", latest, save.tag, error)
            raise

    def _staging_buffer(self) -> StagingBuffer:
        if self._staging is None:
            self._staging = StagingBuffer(self.options.io_buffer_size)
        return self._staging


def wait_all() -> None:
    """Finishes and commits the checkpoint in flight of every live fast_aio engine in this process.

    For code that does not hold the DeepSpeed engine, such as a training
    framework's callback. Every rank must call it.
    """
    for engine in list(_live_engines):
        engine.wait()


def wait(ds_engine) -> None:
    """Finishes and commits the checkpoint a DeepSpeed engine is writing in the background.

    With ``"async": true`` a checkpoint is committed at the next optimizer
    step; call this to commit it sooner, e.g. before evaluating or exiting
    abnormally. Every rank must call it. Does nothing for other engines or
    when no checkpoint is in flight.

    Raises:
        OSError, CommitError, BackgroundWriterError: when the checkpoint cannot be committed.
    """
    checkpoint_engine = getattr(ds_engine, "checkpoint_engine", None)
    if isinstance(checkpoint_engine, FastAioCheckpointEngine):
        checkpoint_engine.wait()


_live_engines: "weakref.WeakSet[FastAioCheckpointEngine]" = weakref.WeakSet()


def _commit_at_exit(engine: FastAioCheckpointEngine) -> None:
    """Commits an async checkpoint still in flight when the interpreter exits normally."""
    reference = weakref.ref(engine)

    def commit_in_flight():
        live = reference()
        if live is None:
            return
        try:
            live.wait()
        except Exception:  # the interpreter is exiting: say what was lost, loudly
            logger.exception("ds_fastckpt could not commit the checkpoint in flight at exit")

    atexit.register(commit_in_flight)


def _read_if_exists(path: Path) -> Optional[bytes]:
    """``path``'s content, to restore if the commit fails; None when there is nothing worth restoring."""
    try:
        return read_small_file(path)
    except (FileNotFoundError, UnsafeSmallFileError):
        return None  # a FIFO, link, device or oversized file under our name: the commit replaces it anyway

