"""ds_fastckpt: fast, durable, leak-proof checkpointing for DeepSpeed.

Importing the package hooks DeepSpeed so that ``"checkpoint": {"engine": "fast_aio"}``
in a ds_config selects ``FastAioCheckpointEngine``. ``wait(engine)`` commits an
async checkpoint still in flight; ``wait_all()`` does so for every engine of the process.
"""

from ds_fastckpt._version import __version__
from ds_fastckpt.compat import check_deepspeed_version

check_deepspeed_version()  # a DeepSpeed outside setup.py's range stops here, before the imports below hook it

from ds_fastckpt.decisions.deleter import UnsafeDeletionError
from ds_fastckpt.decisions.disk_guard import InsufficientSpaceError
from ds_fastckpt.decisions.fd_audit import FdLeakError
from ds_fastckpt.engine import registration
from ds_fastckpt.engine.background import BackgroundWriterError
from ds_fastckpt.engine.checkpoint_engine import FastAioCheckpointEngine
from ds_fastckpt.engine.config import ConfigError, FastAioConfig
from ds_fastckpt.engine.in_flight import wait, wait_all
from ds_fastckpt.engine.rank_group import CommitError
from ds_fastckpt.format.integrity import CheckpointIntegrityError
from ds_fastckpt.format.manifest import ManifestError
from ds_fastckpt.format.safe_load import UnsafeCheckpointError
from ds_fastckpt.format.save_dir_lock import SaveDirLockedError
from ds_fastckpt.format.tags import InvalidTagError
from ds_fastckpt.integrations import wiring as _integration_wiring
from ds_fastckpt.integrations.pending_checkpoints import PendingCheckpointError
from ds_fastckpt.native.fd_accounting import (OpenFd, OpFdCounters, deleted_fds_under, op_fd_counters, open_fds,
                                              open_fds_under)
from ds_fastckpt.native.op_builder import FastCkptBuilder
from ds_fastckpt.native.staging import StagingBuffer
from ds_fastckpt.native.writer import AioFileWriter

registration.install()
_integration_wiring.install()  # the Hugging Face Trainer and accelerate, now or when they are imported

__all__ = [
    "AioFileWriter",
    "BackgroundWriterError",
    "CheckpointIntegrityError",
    "CommitError",
    "ConfigError",
    "FastAioCheckpointEngine",
    "FastAioConfig",
    "FastCkptBuilder",
    "FdLeakError",
    "InsufficientSpaceError",
    "InvalidTagError",
    "ManifestError",
    "OpFdCounters",
    "OpenFd",
    "PendingCheckpointError",
    "SaveDirLockedError",
    "StagingBuffer",
    "UnsafeCheckpointError",
    "UnsafeDeletionError",
    "deleted_fds_under",
    "op_fd_counters",
    "open_fds",
    "open_fds_under",
    "wait",
    "wait_all",
]
