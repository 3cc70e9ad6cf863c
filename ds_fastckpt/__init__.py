"""ds_fastckpt: fast, durable, leak-proof checkpoint writing for DeepSpeed."""

from .fd_accounting import OpenFd, OpFdCounters, deleted_fds_under, open_fds, open_fds_under, op_fd_counters
from .op_builder import FastCkptBuilder
from .staging import StagingBuffer
from .writer import AioFileWriter

__version__ = "0.1.0"

__all__ = [
    "AioFileWriter",
    "FastCkptBuilder",
    "OpFdCounters",
    "OpenFd",
    "StagingBuffer",
    "deleted_fds_under",
    "op_fd_counters",
    "open_fds",
    "open_fds_under",
]
