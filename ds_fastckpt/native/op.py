"""The native op, loaded once per process, and the limits it enforces."""

import functools

from ds_fastckpt.native.op_builder import FastCkptBuilder

# O_DIRECT alignment the op requires for buffers, lengths and offsets: csrc/direct_io.h kDirectAlignment, which the
# op exports as DIRECT_ALIGNMENT (tests/op/test_crc32c.py checks that the two agree).
DIRECT_ALIGNMENT = 4096
# The deepest queue the op accepts (csrc/aio_queue.h kMaxQueueDepth): far beyond what a disk gains from, and
# the kernel's default fs.aio-max-nr, which io_setup() checks every queue against.
MAX_QUEUE_DEPTH = 65536


@functools.lru_cache(maxsize=None)
def load_op():
    """The native op, built or loaded once per process."""
    return FastCkptBuilder().load()
