"""The libaio tuning and staging size the native writer accepts, declared once as pydantic fields.

``AioTuning`` holds ``block_size`` and ``queue_depth``, with DeepSpeed's own
``"aio"`` defaults; ``IoBufferSize`` and ``DEFAULT_IO_BUFFER_SIZE`` declare the
staging half. The engine's config (``ds_fastckpt.engine.config``), the writer
and the staging buffer all validate through these declarations, and
``native.refusals`` words every refusal from the same field metadata, so a
limit and the message that states it cannot drift apart.

The op keeps its own checks (csrc/): these only make the common mistakes fail
early, with the argument's name and what is allowed.
"""

from typing import Annotated, Any

from deepspeed.runtime.swap_tensor.constants import AIO_BLOCK_SIZE_DEFAULT, AIO_QUEUE_DEPTH_DEFAULT
from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from ds_fastckpt.native.op import DIRECT_ALIGNMENT, MAX_QUEUE_DEPTH
from ds_fastckpt.native.refusals import NotAllowed, allowed_values, refusal

# Bytes per staging half: large enough that a half is written with several block_size requests in flight,
# small enough that two halves per rank are cheap to pin.
DEFAULT_IO_BUFFER_SIZE = 16 << 20

# O_DIRECT needs every request to be a whole number of aligned blocks.
BlockSize = Annotated[StrictInt, Field(gt=0, multiple_of=DIRECT_ALIGNMENT)]
QueueDepth = Annotated[StrictInt, Field(ge=1, le=MAX_QUEUE_DEPTH)]
# Each half is written as whole aligned blocks, so its size is aligned too.
IoBufferSize = Annotated[StrictInt, Field(gt=0, multiple_of=DIRECT_ALIGNMENT)]

_IO_BUFFER_SIZE = TypeAdapter(IoBufferSize)


class AioTuning(BaseModel):
    """libaio tuning of one writer or reader: requests of ``block_size`` bytes, ``queue_depth`` of them in flight.

    Strict: an integer given as a string, float or bool is refused, not converted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    block_size: BlockSize = AIO_BLOCK_SIZE_DEFAULT
    """Bytes per request; a positive multiple of 4096 (O_DIRECT)."""

    queue_depth: QueueDepth = AIO_QUEUE_DEPTH_DEFAULT
    """Requests in flight; 1 to ``MAX_QUEUE_DEPTH``, the op's own limit."""


# DeepSpeed's "aio" defaults, for the signatures of the writer, the reader and the benchmarks.
DEFAULT_TUNING = AioTuning()


def check_tuning(**values: Any) -> AioTuning:
    """An ``AioTuning`` of ``values``; the defaults for those left out.

    Raises:
        NotAllowed: naming the first refused argument, its value and what is allowed.
    """
    try:
        return AioTuning(**values)
    except ValidationError as error:
        found = refusal(AioTuning, error)
        raise NotAllowed(found.key, values.get(found.key), found.allowed) from None


def check_io_buffer_size(io_buffer_size: Any) -> int:
    """``io_buffer_size`` when it is a positive multiple of 4096.

    Raises:
        NotAllowed: otherwise, naming ``io_buffer_size`` and its value.
    """
    try:
        return _IO_BUFFER_SIZE.validate_python(io_buffer_size)
    except ValidationError:
        raise NotAllowed("io_buffer_size", io_buffer_size,
                         allowed_values(FieldInfo.from_annotation(IoBufferSize))) from None
