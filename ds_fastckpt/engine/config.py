"""The ``"checkpoint"`` section of a DeepSpeed config, as ds_fastckpt reads it.

```json
"checkpoint": {"engine": "fast_aio",
               "fast_aio": {"keep_last": 3, "keep_every": 0, "fsync": true, "verify": "size",
                            "fd_audit": "raise", "io_buffer_size": 67108864}}
```

libaio tuning (``block_size``, ``queue_depth``) comes from DeepSpeed's own
top-level ``"aio"`` section, checked through ``ds_fastckpt.native.tuning.AioTuning``.
Each option is declared once, as a pydantic field with its default and
constraints; the error messages are worded from those declarations
(``ds_fastckpt.native.tuning.allowed_values``).

Two values are also bounded by the host, so that a value the first save cannot
use fails in ``deepspeed.initialize`` instead, hours into a job:
``io_buffer_size`` by physical memory and ``queue_depth`` by the kernel's
``fs.aio-max-nr`` (see ``max_io_buffer_size`` and ``max_queue_depth``).
"""

import os
from typing import Annotated, Any, Dict, Literal, Mapping, Optional, Union

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import Field, StrictBool, StrictFloat, StrictInt, ValidationError

from ds_fastckpt.native.op import DIRECT_ALIGNMENT, MAX_QUEUE_DEPTH
from ds_fastckpt.native.refusals import refusal
from ds_fastckpt.native.tuning import DEFAULT_IO_BUFFER_SIZE, AioTuning, IoBufferSize
from ds_fastckpt.remote.options import REPLICATE_KEY, ReplicateConfig, ReplicateConfigError, parse_replicate

ENGINE_KEY = "engine"
SECTION_KEY = "fast_aio"
FAST_AIO = "fast_aio"
# "torch" names DeepSpeed's default engine, the same as leaving "engine" out.
ENGINE_NAMES = (FAST_AIO, "torch")

# libaio contexts one rank may hold at once, each of queue_depth events: the op keeps a finished writer's
# context for the next file, and a read (a load) can run beside a write (an async save).
AIO_CONTEXTS_PER_RANK = 2
AIO_MAX_NR_PATH = "/proc/sys/fs/aio-max-nr"
# The staging halves of all ranks on a node may take at most this share of its physical memory; the rest
# is for the model, the optimizer and the state being serialized.
STAGING_MEMORY_SHARE = 0.5
# A timeout: positive, and finite (NaN and inf would fire at once or never).
Seconds = Annotated[Union[StrictInt, StrictFloat],
                    Field(gt=0, allow_inf_nan=False, json_schema_extra={"unit": "seconds"})]
# Launchers' variables for the number of ranks on this node: torchrun, DeepSpeed's launcher, Open MPI.
_LOCAL_RANKS_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


class ConfigError(ValueError):
    """A ``checkpoint`` config value ds_fastckpt cannot use; the message names the key, the value and what is allowed."""


class FastAioConfig(DeepSpeedConfigModel):
    """Options of the ``fast_aio`` engine."""

    keep_last: StrictInt = Field(0, ge=0, json_schema_extra={"note": "0 keeps every checkpoint"})
    """Complete checkpoints to keep, newest by commit order; 0 keeps all."""

    keep_every: StrictInt = Field(0, ge=0, json_schema_extra={"note": "0 turns it off"})
    """Also keep every checkpoint whose step is a multiple of this; 0 turns it off."""

    fsync: StrictBool = True
    """fsync every file, manifest, ``latest`` and directory, so a commit survives a power loss."""

    verify: Literal["off", "size", "checksum"] = "size"
    """What to check against the manifest before loading: nothing, file sizes, or sizes and CRC-32C."""

    fd_audit: Literal["raise", "warn", "off"] = "raise"
    """After each save and rotation: fail, log, or skip when descriptors still point into save_dir."""

    io_buffer_size: IoBufferSize = DEFAULT_IO_BUFFER_SIZE
    """Bytes per staging half (two halves per rank, allocated when the engine is created); a positive multiple of
    4096, and at most ``max_io_buffer_size()``: the halves of all ranks on a node within half its physical memory."""

    torch_crc32: StrictBool = False
    """Let torch.save compute its zip CRC32 per record. Off by default: torch.load never checks it (a
    flipped bit loads silently), it costs about 0.5 s per GiB on the saving thread, and the manifest's
    CRC-32C already covers every byte. Turn it on for tools that unzip checkpoints and check CRCs."""

    trusted_pickles: StrictBool = False
    """Load with full pickle (``weights_only=False``), as DeepSpeed does. Off by default: a tampered
    checkpoint could run code. Turn on only for checkpoints you trust that hold objects beyond
    DeepSpeed's own (see ``ds_fastckpt.format.safe_load``)."""

    skip_damaged_on_resume: StrictBool = False
    """``load_checkpoint(dir)`` without a tag: check checkpoints newest first (sizes and archive ends; CRC-32C
    too with ``verify`` "checksum") and resume from the newest intact one, with a warning naming what was
    skipped. Off by default: a damaged newest checkpoint raises, so training never silently goes back."""

    background_delete: StrictBool = False
    """Remove the files of rotated checkpoints on a background thread (``ds_fastckpt-remover``). Each is first
    renamed to its trash name and save_dir fsynced before the save returns, as always; only the unlinking, which
    costs about as much as writing on filesystems mounted with ``discard``, is left to the thread. Off by
    default: then the disk space is free when the save returns. Async saves always remove in the background."""

    recycle_retired: StrictBool = True
    """Keep the newest checkpoint rotation retires as ``.<tag>.ds_fastckpt-spare`` until the next save, which
    writes its files over that one's blocks in place (same file name, one link, open nowhere else) instead of
    allocating new blocks and freeing the old ones; the rotation after it removes the spare. A save then costs
    what writing the bytes costs: freeing 1 GB took 0.9-2.4 s here (``discard`` mount), writing it 0.6 s. The
    most disk in use during a save is unchanged (``keep_last`` checkpoints plus the one being written); between
    saves the spare holds one more. Off: the disk space is freed at each rotation."""

    parallel_writers: Literal["off", "all", "node"] = "all"
    """Who writes the model-states file (``mp_rank_XX_model_states.pt``) that every data-parallel rank holds a
    copy of with ZeRO stages 0-2: ``"all"``, every rank of the data-parallel group writes a share of its
    parameter bytes into the same file (storage all ranks share); ``"node"``, the ranks of the group on the
    writing rank's host (with ``use_node_local_storage``: on each host, that host's copy); ``"off"``, the one
    rank DeepSpeed picks. Left out, it is ``"all"``, or ``"node"`` with ``use_node_local_storage``. The file
    is byte for byte the same. See README "Parallel writers"."""

    async_save: StrictBool = Field(False, alias="async")
    """Write in the background: ``save_checkpoint`` returns at once; the commit happens at the next
    optimizer step (DeepSpeed's decoupled-engine protocol), ``engine.destroy()``, ``ds_fastckpt.wait(engine)``
    or interpreter exit, whichever comes first."""

    snapshot: StrictBool = False
    """With ``async``: copy every file's tensors into host memory before ``save`` returns (accelerator tensors by
    DMA into pinned memory), so the writes never read live tensors: training waits only for the copies, and the
    commit happens at the first optimizer step after every rank's writes have finished, not before the next
    step. Costs a host copy of the state."""

    snapshot_max_bytes: StrictInt = Field(0, ge=0, json_schema_extra={"note": "0 sets no limit"})
    """With ``snapshot``: host memory the snapshots of one checkpoint may take, in bytes. A file whose snapshot
    would pass it is written at once instead, with training waiting for it, and a warning says so."""

    async_timeout_s: Seconds = 1800
    """With ``async``: how long a commit waits for the background writer before failing."""

    commit_timeout_s: Seconds = 1800
    """With several ranks: how long a rank waits at the start and at the commit of a save for the
    others (still writing, or dead) before the save fails with ``CommitError`` on it."""

    replicate: Optional[ReplicateConfig] = None
    """The remote tier (see ``ds_fastckpt.remote.options``): every committed checkpoint is also uploaded in the
    background to ``replicate.url``, and a resume takes the newest complete checkpoint of either tier."""


# The keys a user writes: the alias where a field has one ("async" is a Python keyword).
_KEYS = tuple(field.alias or name for name, field in FastAioConfig.model_fields.items())


def engine_name(checkpoint_section: Mapping[str, Any]) -> str:
    """The engine the ``checkpoint`` section asks for; ``"torch"`` when it names none.

    Raises:
        ConfigError: for a name that is not one of ``ENGINE_NAMES``.
    """
    name = checkpoint_section.get(ENGINE_KEY, "torch")
    if name not in ENGINE_NAMES:
        raise ConfigError(f"checkpoint.engine={name!r} is not allowed: use one of "
                          f"{', '.join(repr(n) for n in ENGINE_NAMES)} (\"fast_aio\" needs 'import ds_fastckpt')")
    return name


def local_ranks() -> int:
    """Ranks on this node, as the launcher says (torchrun, DeepSpeed's launcher, Open MPI); 1 without one."""
    for name in _LOCAL_RANKS_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def physical_memory() -> Optional[int]:
    """Bytes of physical memory on this host, or None where the OS does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def aio_max_nr() -> Optional[int]:
    """The kernel's ``fs.aio-max-nr``: libaio events all contexts on this host may hold together; None if unknown."""
    try:
        with open(AIO_MAX_NR_PATH, encoding="ascii") as file:
            return int(file.read())
    except (OSError, ValueError):
        return None


def max_io_buffer_size() -> Optional[int]:
    """The largest ``io_buffer_size`` this host allows, a multiple of 4096; None when physical memory is unknown.

    Each rank holds two halves, and those of all ranks on the node together
    may take ``STAGING_MEMORY_SHARE`` of physical memory.
    """
    memory = physical_memory()
    if memory is None:
        return None
    per_half = int(memory * STAGING_MEMORY_SHARE) // (2 * local_ranks())
    return per_half // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT


def max_queue_depth() -> int:
    """The deepest ``aio.queue_depth`` this host allows.

    ``io_setup()`` fails with EAGAIN once the contexts of all processes hold
    more than ``fs.aio-max-nr`` events; each rank on the node may hold
    ``AIO_CONTEXTS_PER_RANK`` contexts of ``queue_depth`` events. Never more
    than ``MAX_QUEUE_DEPTH``, the op's own limit.
    """
    limit = aio_max_nr()
    if limit is None:
        return MAX_QUEUE_DEPTH
    return min(MAX_QUEUE_DEPTH, limit // (AIO_CONTEXTS_PER_RANK * local_ranks()))


def parse_fast_aio(checkpoint_section: Mapping[str, Any], *, check_host: bool = True) -> FastAioConfig:
    """Validates ``checkpoint.fast_aio``.

    Args:
        checkpoint_section: DeepSpeed's ``checkpoint`` section.
        check_host: also check ``io_buffer_size`` against this host's memory
            (see ``max_io_buffer_size``); leave it on wherever the config is
            used to save, turn it off to read a config written for another host.

    Raises:
        ConfigError: for an unknown key or a value that is not allowed.
    """
    section = checkpoint_section.get(SECTION_KEY) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"checkpoint.fast_aio={section!r} is not allowed: it must be an object of options")
    unknown = sorted(set(section) - set(_KEYS), key=str)
    if unknown:
        raise ConfigError(f"checkpoint.fast_aio has unknown key(s) {', '.join(map(repr, unknown))}: "
                          f"allowed keys are {', '.join(_KEYS)}")
    section = dict(section)
    try:
        replicate = parse_replicate(section.pop(REPLICATE_KEY, None))
    except ReplicateConfigError as error:
        raise ConfigError(str(error)) from None
    try:
        # strict=True: DeepSpeedConfigModel would otherwise drop every "auto" value, silently using the default.
        config = FastAioConfig(strict=True, replicate=replicate, **section)
    except ValidationError as error:
        refused = refusal(FastAioConfig, error)
        raise ConfigError(f"checkpoint.fast_aio.{refused.key}={section[refused.key]!r} is not allowed: "
                          f"it must be {refused.allowed}") from None
    if check_host:
        _check_io_buffer_size(config.io_buffer_size)
    return config


def _check_io_buffer_size(io_buffer_size: int) -> None:
    limit = max_io_buffer_size()
    if limit is not None and io_buffer_size > limit:
        raise ConfigError(
            f"checkpoint.fast_aio.io_buffer_size={io_buffer_size} is not allowed on this host: it must be at most "
            f"{limit} bytes. Each rank holds two halves of it in host memory, and the halves of all "
            f"{local_ranks()} rank(s) on this node may take at most {STAGING_MEMORY_SHARE:.0%} of its "
            f"{physical_memory()} bytes of physical memory; a larger buffer would fail to allocate, or leave too "
            f"little for training, when the engine is created")


def aio_tuning(aio_section: Mapping[str, Any]) -> Dict[str, int]:
    """``block_size`` and ``queue_depth`` from DeepSpeed's parsed ``"aio"`` section, checked for O_DIRECT.

    Parsed through ``AioTuning``: a key left out takes DeepSpeed's default, and
    the section's other keys (``intra_op_parallelism``, ...) are DeepSpeed's own.

    Returns:
        ``{"block_size": ..., "queue_depth": ...}``, the writer's keyword arguments.

    Raises:
        ConfigError: for a block size that is not a positive multiple of 4096, or a queue depth below 1
            or above what this host allows (``max_queue_depth``).
    """
    values = {key: aio_section[key] for key in AioTuning.model_fields if key in aio_section}
    try:
        tuning = AioTuning(**values)
    except ValidationError as error:
        refused = refusal(AioTuning, error)
        if refused.key == "queue_depth" and refused.too_large:
            # Beyond the op's limit is beyond the host's too, and the host's message says what to change.
            _check_queue_depth(values["queue_depth"])
        raise ConfigError(f"aio.{refused.key}={values[refused.key]!r} is not allowed with checkpoint engine "
                          f"fast_aio: it must be {refused.allowed}") from None
    _check_queue_depth(tuning.queue_depth)
    return {"block_size": tuning.block_size, "queue_depth": tuning.queue_depth}


def _check_queue_depth(queue_depth: int) -> None:
    limit = max_queue_depth()
    if queue_depth > limit:
        raise ConfigError(f"aio.queue_depth={queue_depth} is not allowed with checkpoint engine fast_aio on this "
                          f"host: it must be at most {limit}. {_queue_depth_reason(limit)}")


def _queue_depth_reason(limit: int) -> str:
    events = aio_max_nr()
    if events is None or limit == MAX_QUEUE_DEPTH:
        return (f"{MAX_QUEUE_DEPTH} is the deepest queue the op accepts; disks gain nothing from deeper ones "
                f"(and fs.aio-max-nr is {'unknown here' if events is None else events})")
    return (f"The kernel's fs.aio-max-nr ({AIO_MAX_NR_PATH}) is {events}: libaio events all processes on this host "
            f"may hold together, and each of the {local_ranks()} rank(s) on this node may hold "
            f"{AIO_CONTEXTS_PER_RANK} queues of queue_depth events, so a deeper queue fails in io_setup with EAGAIN "
            f"at the first save. Lower aio.queue_depth or raise fs.aio-max-nr (sysctl -w fs.aio-max-nr=N)")
