"""ds_fastckpt: fast, durable, leak-proof checkpointing for DeepSpeed.

Importing the package hooks DeepSpeed so that ``"checkpoint": {"engine": "fast_aio"}``
in a ds_config selects ``FastAioCheckpointEngine``. ``wait(engine)`` commits an
async checkpoint still in flight; ``wait_all()`` does so for every engine of the process.
"""

from . import registration
from .config import ConfigError, FastAioConfig
from .deleter import UnsafeDeletionError
from .disk_guard import InsufficientSpaceError
from .background import BackgroundWriterError
from .engine import CommitError, FastAioCheckpointEngine, wait, wait_all
from .fd_accounting import OpenFd, OpFdCounters, deleted_fds_under, open_fds, open_fds_under, op_fd_counters
from .fd_audit import FdLeakError
from .integrity import CheckpointIntegrityError
from .manifest import ManifestError
from .op_builder import FastCkptBuilder
from .safe_load import UnsafeCheckpointError
from .save_dir_lock import SaveDirLockedError
from .staging import StagingBuffer
from .tags import InvalidTagError
from .writer import AioFileWriter

__version__ = "0.1.0"

registration.install()

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
