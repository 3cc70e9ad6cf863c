"""Test hook: make the native op's next call of a syscall fail, to exercise error paths without a broken disk."""

import contextlib
import errno as errno_module

from ds_fastckpt.native.op import load_op

POINTS = ("open_direct", "open", "write", "read", "ftruncate", "fsync", "close")


@contextlib.contextmanager
def inject_fault(point: str, errno: int = errno_module.EIO, skip: int = 0):
    """Within the block, hit number ``skip + 1`` of ``point`` in the op fails with ``errno``.

    ``open_direct`` failing with EINVAL is how a filesystem that rejects
    O_DIRECT looks to the op. Faults are process-wide; all are cleared on exit.

    Raises:
        ValueError: for a point the op does not know.
    """
    if point not in POINTS:
        raise ValueError(f"point={point!r} is not allowed: choose one of {', '.join(POINTS)}")
    op = load_op()
    op._arm_fault(point, errno, skip)
    try:
        yield
    finally:
        op._disarm_faults()
