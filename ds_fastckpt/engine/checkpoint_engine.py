"""The ``fast_aio`` checkpoint engine: DeepSpeed's engine protocol over AioFileWriter, with atomic commit."""

import concurrent.futures
import logging
import os
import socket
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from ds_fastckpt.decisions.retention import policy_from_config
from ds_fastckpt.decisions.rotation import Rotation
from ds_fastckpt.engine import collectives, in_flight
from ds_fastckpt.engine.background import REMOVER_THREAD_NAME, BackgroundWriter, snapshot_or_original, wait_for
from ds_fastckpt.engine.commit import SaveInProgress, publish_and_rotate
from ds_fastckpt.engine.config import FastAioConfig
from ds_fastckpt.engine.pending import prepare_pending
from ds_fastckpt.engine.rank_fd_audit import audit_fds
from ds_fastckpt.engine.rank_group import CommitError, RankGroup
from ds_fastckpt.engine.remote_resume import TierResume, resume_across_tiers
from ds_fastckpt.engine.replication import Replication
from ds_fastckpt.engine.shared_write import FileShare, join_shares, plan_share
from ds_fastckpt.engine.verified_load import VerifiedLoader
from ds_fastckpt.engine.writer_groups import WriterGroup, form_writer_group
from ds_fastckpt.faults import save_points
from ds_fastckpt.format import save_dir_lock
from ds_fastckpt.format.manifest import FileRecord
from ds_fastckpt.format.names import pending_path
from ds_fastckpt.format.records import CheckpointRecord
from ds_fastckpt.format.tags import validate_tag
from ds_fastckpt.native.device_copy import DeviceCopier
from ds_fastckpt.native.file_part import FilePart
from ds_fastckpt.native.layout_save import Layout, save_layout_first
from ds_fastckpt.native.op import load_op
from ds_fastckpt.native.staging import StagingBuffer
from ds_fastckpt.native.writer import AioFileWriter, torch_zip_crc32

logger = logging.getLogger(__name__)

ENGINE_NAME = "FastAioCheckpointEngine"


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
       paths inside ``save_dir/<tag>`` are written into the pending directory
       (the model-states file by its whole writer group: ``shared_write``).
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
    for the writes and then does step 3 exactly as above. With ``snapshot``
    the files are host copies taken in ``save``, so no write reads a live
    tensor: ``commit`` at each boundary first asks every rank (a collective)
    whether its writes have ended, and commits only once all have; training
    waits for the copies, not the disk. A second ``save_checkpoint`` first
    commits the one in flight; ``cleanup`` (from ``engine.destroy()``),
    ``wait()``, a load, ``torch.distributed.destroy_process_group()`` and a
    normal interpreter exit commit it too. An exit by uncaught exception, the
    exit of a forked child and an exit after the process group is gone leave
    it pending (``in_flight``): the checkpoint before it is what resumes.

    ``load(path)`` reads the file with O_DIRECT, verifies it against its
    manifest as ``verify`` says and deserializes it from memory (see
    ``verified_load``); it works on torch >= 2.6.

    Args:
        config_params: DeepSpeed's config object.
        options: the validated ``checkpoint.fast_aio`` section.
        tuning: ``block_size`` and ``queue_depth`` from DeepSpeed's ``aio`` section.
        node_local: DeepSpeed's ``checkpoint.use_node_local_storage``.
        data_parallel_ranks: the global ranks of this rank's data-parallel group, when ``parallel_writers``
            applies (ZeRO stage 0-2 without MoE); None writes every file from one rank.
        parallel_writers: the mode in force ("all" or "node"), the option's default resolved.
    """

    def __init__(self, config_params, options: FastAioConfig, tuning: Dict[str, int], node_local: bool = False,
                 data_parallel_ranks: Optional[Sequence[int]] = None, parallel_writers: str = "off"):
        super().__init__(config_params)
        self.name = ENGINE_NAME
        self.options = options
        self.tuning = tuning
        self.node_local = node_local
        self._host = socket.gethostname()
        self._staging: Optional[StagingBuffer] = None
        self._device_copiers: Dict[torch.device, DeviceCopier] = {}  # pinned blocks per accelerator, reused
        self._save: Optional[SaveInProgress] = None
        self._next_step: Optional[int] = None
        self._next_save_latest = True
        self._ranks = RankGroup(options.commit_timeout_s)
        self._writers: Optional[WriterGroup] = None if data_parallel_ranks is None or parallel_writers == "off" \
            else form_writer_group(parallel_writers, node_local, data_parallel_ranks, self._ranks)
        self._next_replicated: Optional[Path] = None
        self._per_rank: Tuple[torch.Tensor, ...] = ()  # from prepare_save: parameters never shared (plan_share)
        self._loader = VerifiedLoader(options, tuning, self._ranks.gather, node_local=node_local)
        self._background: Optional[BackgroundWriter] = None
        self._remover: Optional[BackgroundWriter] = None  # sync saves with background_delete only
        # Built once: the retention policy, and the removals of rotated checkpoints still running in the background.
        self._rotation = Rotation(policy_from_config(options), options.async_timeout_s)
        self._replication = None if options.replicate is None else Replication(options.replicate, self._ranks,
                                                                                node_local, self._rotation)
        self._lock = save_dir_lock.OneLock()  # the save_dir lock this engine holds: one at a time
        self._saved_dirs: Set[str] = set()  # every save_dir saved into, resolved, for the fd audit
        self._checkpoint_dirs: Set[str] = set()  # every checkpoint directory committed, resolved, for the fd audit
        self._checkpoint_save_next = False  # set by save_checkpoint: the next create() starts a checkpoint
        self._file_save = False  # between create() and commit() of a save that is not a checkpoint
        self._failed_pending: Optional[Path] = None  # pending dir of a save that failed, removed at the next
        load_op()  # build or load the op now, not in the middle of the first save
        self._staging_buffer()  # allocate (and pin) the staging halves now: a failure surfaces at initialize
        in_flight.track(self)
        if options.async_save:
            self._background = BackgroundWriter()
            in_flight.commit_at_exit(self)
        elif options.background_delete:
            self._remover = BackgroundWriter(REMOVER_THREAD_NAME)

    def prepare_save(self, step: Optional[int], save_latest: bool, replicated: Optional[str] = None,
                     per_rank: Sequence[torch.Tensor] = ()) -> None:
        """Called by the ``save_checkpoint`` hook: the step for the manifest and whether to write ``latest``.

        DeepSpeed itself writes ``latest`` with a plain ``open('w')`` after
        ``commit``; the hook tells DeepSpeed not to and this engine writes it
        atomically instead. ``replicated`` is the model-states file that
        every rank of this rank's writer group saves (``parallel_writers``);
        ``per_rank`` the parameters DeepSpeed marks as each rank's own
        (``ds_optim_param``), which only the leader writes of that file.
        """
        self._next_step = step
        self._next_save_latest = save_latest
        self._next_replicated = None if replicated is None else Path(replicated).absolute()
        self._per_rank = tuple(per_rank)
        self._checkpoint_save_next = True
        self._file_save = False

    def is_storage_leader(self) -> bool:
        if self.node_local:
            return int(os.environ.get("LOCAL_RANK", "0")) == 0
        return self._ranks.rank == 0  # the rank at creation: once the process group is gone every rank says 0

    @property
    def writes_in_parallel(self) -> bool:
        """Whether this rank writes a share of the replicated model-states file (``parallel_writers``)."""
        return self._writers is not None

    def is_data_parallel_writer(self, dp_rank):
        """Asked at initialization: does this rank save the model-states file? Yes in a writer group."""
        return self._writers is not None or dp_rank == 0

    def is_decoupled(self):
        return self.options.async_save

    def get_commit_info(self):
        if self._save is None:
            return None
        # save_latest=False: DeepSpeed would write `latest` with a plain open(); commit() writes it atomically.
        return CheckpointCommitInfo(tag=self._save.tag, save_dir=str(self._save.save_dir), save_latest=False)

    def wait(self) -> None:
        """Finishes and commits the checkpoint in flight, if any. Every rank must call it."""
        if self._save is not None:
            self._commit_now()

    def cleanup(self):
        self.wait()
        self.wait_replication()
        if self._replication is not None:
            self._replication.close()
        self._rotation.finish_removals()
        for thread in filter(None, (self._background, self._remover)):
            thread.shutdown()
        self._background = self._remover = None
        self._lock.release()

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
        save = SaveInProgress(save_dir, tag, pending_path(save_dir, tag), self._next_step, self._next_save_latest,
                              replicated=self._next_replicated)
        self._next_step, self._next_save_latest, self._next_replicated = None, True, None
        self._on_leader(lambda: prepare_pending(save, abandoned, self._rotation, self._lock,
                                                self.options.recycle_retired),
                        f"checkpoint {tag!r} cannot start")
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
        target = save.redirect(path) or Path(path)
        if self._writers is not None and Path(path).absolute() == save.replicated:
            state_dict = self._plan_share(state_dict, target, save)
            if state_dict is None:
                return
        if save.failed is not None:
            return  # this checkpoint already failed on this rank; writing more of it is wasted
        try:
            if self._background is None:
                record = self._write_file(state_dict, target, save)
                if record is not None:  # None for a path outside the checkpoint directory
                    save.files.append(record)
                return
            payload, size = snapshot_or_original(state_dict, save.tag, self.options.snapshot_max_bytes,
                                                 save.snapshot_bytes, self.options.torch_crc32) \
                if self.options.snapshot else (state_dict, 0)
            save.snapshot_bytes += size
            write = self._background.submit(self._write_file, payload, target, save)
            save.pending_writes.append(write)
            if self.options.snapshot and payload is state_dict:  # no room for a snapshot: written before we return
                concurrent.futures.wait([write])
        except Exception as error:  # commit() raises it, once every rank has heard, so that none waits for us
            save.failed = error
            logger.error("writing %s failed; checkpoint %r will not be committed: %s", target, save.tag, error)

    def _plan_share(self, state_dict, target: Path, save: SaveInProgress):
        """This rank's part of the replicated file (see ``shared_write.plan_share``), or None to write nothing."""
        try:
            with torch_zip_crc32(self.options.torch_crc32):  # decides whether the file can be laid out first
                return plan_share(state_dict, self._writers,
                                  lambda size: save.make_shared_file(target, size, self.options.recycle_retired),
                                  f"checkpoint {save.tag!r}, {target.name}", taking_part=save.failed is None,
                                  per_rank=self._per_rank)
        except Exception as error:  # commit() raises it, once every rank has heard, so that none waits for us
            save.failed = save.failed or error
            logger.error("writing %s failed; checkpoint %r will not be committed: %s", target, save.tag, error)
            return None

    def _write_file(self, payload, path: Path, save: Optional[SaveInProgress]) -> Union[FileRecord, FileShare, None]:
        """Writes one file durably: a state laid out first (``layout_save``), a snapshot, serialized bytes, or
        this rank's part of a shared file (``FilePart``)."""
        shared = isinstance(payload, FilePart)
        overwrite = not shared and save is not None and self.options.recycle_retired and save.take_spare_file(path)
        with torch_zip_crc32(self.options.torch_crc32), \
                AioFileWriter(path, staging=self._staging_buffer(), fsync=self.options.fsync, overwrite=overwrite,
                              shared=shared, **self.tuning) as writer:
            if isinstance(payload, bytes):
                writer.write(payload)
            elif isinstance(payload, (Layout, FilePart)):
                payload.write_to(writer, self._device_copiers)
            else:
                save_layout_first(payload, writer, self._device_copiers)
            save_points.reached("before_file_close")
        save_points.reached("after_file_write")
        if save is None or not path.is_relative_to(save.pending):
            return None
        relative = path.relative_to(save.pending).as_posix()
        if shared:
            return FileShare(path=relative, file_size=payload.file_size, segments=tuple(writer.segments),
                             rank=collectives.rank(), host=self._host)
        return FileRecord(path=relative, bytes=writer.bytes_written, crc32c=writer.checksum,
                          rank=collectives.rank(), host=self._host)

    def load(self, path: str, map_location=None):
        return self._loader.load(Path(path), map_location=map_location)

    def commit(self, info: CheckpointCommitInfo):
        if self._file_save:
            self._file_save = False
            return True
        if self._save is not None and self.options.snapshot and not self._writes_done_everywhere(self._save):
            return True  # the writes read snapshots, not live tensors: DeepSpeed asks again at its next step
        return self._commit_now()

    def _writes_done_everywhere(self, save: SaveInProgress) -> bool:
        """Whether every rank's writes of ``save`` have ended; the same answer on every rank (a collective)."""
        mine = all(write.done() for write in save.pending_writes)
        return all(self._ranks.gather(mine, f"checkpoint {save.tag!r} was not committed"))

    def _commit_now(self) -> bool:
        save, self._save = self._save, None
        if save is None:
            return True
        written, failure = wait_for(save.pending_writes, self.options.async_timeout_s, f"checkpoint {save.tag!r}")
        failure = save.failed or failure
        mine = save.files + [record for record in written if record is not None]
        report = None if failure is None else f"rank {collectives.rank()}: {type(failure).__name__}: {failure}"
        not_committed = f"checkpoint {save.tag!r} was not committed"
        self._failed_pending = save.pending  # until it is published, the next save removes it
        gathered = self._ranks.gather((mine, report), not_committed)
        reports = [rank_report for _, rank_report in gathered if rank_report]
        if failure is not None:
            raise failure
        if reports:
            raise CommitError(f"{not_committed}: {reports[0]}")
        files = [record for rank_files, _ in gathered for record in rank_files]
        self._on_leader(lambda: self._publish(save, files), not_committed)
        self._failed_pending = None
        if self._replication is not None:
            self._replication.enqueue(save.final, files, save.save_latest, self.is_storage_leader())
        audit_fds(save.save_dir, save.tag, self.options.fd_audit, self._ranks,
                  self._rotation.removing() + (self._replication.reading() if self._replication else []),
                  self._saved_dirs, self._checkpoint_dirs)
        return True

    def verify_before_load(self, tag_dir: Path) -> None:
        """Checks the files of a manifest-carrying tag dir before DeepSpeed loads it, as ``verify`` says."""
        self._loader.verify_before_load(tag_dir)

    def resume_tag(self, save_dir: Path) -> Tuple[Optional[str], str]:
        """The tag ``load_checkpoint(save_dir)`` resumes from, and why (``VerifiedLoader.resume_tag``); with
        ``replicate``, the newest of either tier, restored into ``save_dir`` when only remote (``remote_resume``)."""
        if self._replication is None:
            return self._loader.resume_tag(save_dir)
        tiers = TierResume(self._replication.store, self._ranks, self.is_storage_leader(), self.node_local,
                           self._rotation, self._lock, self.options.fsync, self._loader.forget)
        return resume_across_tiers(save_dir, lambda: self._loader.resume_tag(save_dir), tiers)

    def wait_replication(self, timeout_s: Optional[float] = None) -> List[str]:
        """Waits for the replication of committed checkpoints (``Replication.wait``); returns what is left."""
        return [] if self._replication is None else self._replication.wait(timeout_s)

    def rotate(self, save_dir: Path, protected=()) -> List[CheckpointRecord]:
        """Deletes what the retention policy chooses (see ``rotation.Rotation.apply``); returns what was deleted.

        The files of retired checkpoints are removed off the training thread
        in async mode (on the background writer) and with ``background_delete``
        (on the ``ds_fastckpt-remover`` thread); otherwise here. With
        ``recycle_retired`` the newest retired one stays as the spare.
        """
        remover = self._background or self._remover
        return self._rotation.apply(save_dir, protected, submit=None if remover is None else remover.submit,
                                    keep_spare=self.options.recycle_retired)

    def _on_leader(self, action, failure: str) -> None:
        self._ranks.on_leader(self.is_storage_leader(), action, failure)

    def _publish(self, save: SaveInProgress, files: List[Union[FileRecord, FileShare]]) -> None:
        publish_and_rotate(save, join_shares([record for record in files if record.host == self._host]
                                             if self.node_local else files),
                           fsync=self.options.fsync, changed=self._loader.forget,
                           rotate=lambda: self.rotate(save.save_dir, protected={save.tag}))

    def _staging_buffer(self) -> StagingBuffer:
        if self._staging is None:
            self._staging = StagingBuffer(self.options.io_buffer_size)
        return self._staging
