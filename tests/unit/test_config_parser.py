"""The config parser on its own: every key's accepted and refused values, and the message a user reads.

No ``deepspeed.initialize`` and no native op: ``parse_fast_aio``, ``aio_tuning``
and the tuning declarations are plain functions of a dict (and of this host's
memory and ``fs.aio-max-nr``). tests/engine/test_config.py checks that the same
errors surface from ``deepspeed.initialize``.
"""

import math
import re

import pytest
from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT
from deepspeed.runtime.swap_tensor.constants import AIO_BLOCK_SIZE_DEFAULT, AIO_QUEUE_DEPTH_DEFAULT

from ds_fastckpt import ConfigError, FastAioConfig
from ds_fastckpt.engine import config as config_module
from ds_fastckpt.engine.config import (MAX_QUEUE_DEPTH, aio_max_nr, aio_tuning, engine_name, max_io_buffer_size,
                                       max_queue_depth, parse_fast_aio, physical_memory)
from ds_fastckpt.native.refusals import NotAllowed
from ds_fastckpt.native.tuning import (DEFAULT_IO_BUFFER_SIZE, DEFAULT_TUNING, AioTuning, check_io_buffer_size,
                                       check_tuning)

BOOL = "true or false"
SECONDS = "a finite number of seconds > 0"
BOOL_KEYS = ("fsync", "torch_crc32", "trusted_pickles", "skip_damaged_on_resume", "background_delete",
             "recycle_retired", "async", "snapshot")
ATTRIBUTE = {"async": "async_save"}  # the key a user writes -> FastAioConfig's attribute

# key -> (accepted values, refused values, what the message says is allowed)
TABLE = {
    "keep_last": ([0, 1, 3, 2**40], [-1, -5, "3", 3.0, True, None, "auto"],
                  "an integer >= 0 (0 keeps every checkpoint)"),
    "keep_every": ([0, 1, 1000], [-1, 2.5, "10", False, []], "an integer >= 0 (0 turns it off)"),
    "verify": (["off", "size", "checksum"], ["md5", "SIZE", "", True, None, 0], "one of 'off', 'size', 'checksum'"),
    "fd_audit": (["raise", "warn", "off"], ["loud", "Raise", False, 1], "one of 'raise', 'warn', 'off'"),
    "io_buffer_size": ([4096, 8192, 1 << 20, 64 << 20], [0, -4096, 1000, 4095, 4097, 4096.0, "4096", True, None],
                       "a positive multiple of 4096"),
    "async_timeout_s": ([1, 0.5, 1800, 1e-3, 1e9], [0, -1, -0.5, math.nan, math.inf, -math.inf, "10", True, None],
                        SECONDS),
    "snapshot_max_bytes": ([0, 1, 1 << 40], [-1, 1.5, "1GiB", True, None], "an integer >= 0 (0 sets no limit)"),
    "commit_timeout_s": ([1, 2.5, 1800], [0, -1800, math.nan, math.inf, "1800", False, [1]], SECONDS),
    "parallel_writers": (["off", "all", "node"], ["ALL", "dp", "", True, None, 2], "one of 'off', 'all', 'node'"),
}
TABLE.update({key: ([True, False], ["true", "yes", 1, 0, None, "auto"], BOOL) for key in BOOL_KEYS})

ACCEPTED = [(key, value) for key, (accepted, _, _) in TABLE.items() for value in accepted]
REFUSED = [(key, value, allowed) for key, (_, refused, allowed) in TABLE.items() for value in refused]


@pytest.fixture
def one_rank_per_node(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_table_covers_every_key():
    keys = [field.alias or name for name, field in FastAioConfig.model_fields.items()]
    assert sorted([*TABLE, "replicate"]) == sorted(keys)  # the replicate section: tests/unit/test_replicate_config.py


@pytest.mark.parametrize("key, value", ACCEPTED, ids=repr)
def test_accepted_value_is_kept_as_given(key, value):
    config = parse_fast_aio({"fast_aio": {key: value}})
    kept = getattr(config, ATTRIBUTE.get(key, key))
    assert kept == value and type(kept) is type(value)


@pytest.mark.parametrize("key, value, allowed", REFUSED, ids=repr)
def test_refused_value_names_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as raised:
        parse_fast_aio({"fast_aio": {key: value}})
    assert str(raised.value) == f"checkpoint.fast_aio.{key}={value!r} is not allowed: it must be {allowed}"
    assert isinstance(raised.value, ValueError)


def test_defaults():
    config = parse_fast_aio({})
    assert config == parse_fast_aio({"fast_aio": {}}) == parse_fast_aio({"fast_aio": None})
    assert (config.keep_last, config.keep_every, config.fsync, config.verify, config.fd_audit) == (0, 0, True, "size",
                                                                                                  "raise")
    assert config.io_buffer_size == DEFAULT_IO_BUFFER_SIZE == 16 << 20
    assert (config.torch_crc32, config.trusted_pickles, config.skip_damaged_on_resume, config.async_save,
            config.snapshot) == (False, False, False, False, False)
    assert (config.async_timeout_s, config.commit_timeout_s) == (1800, 1800)


def test_first_refused_key_is_named_when_several_are_wrong():
    with pytest.raises(ConfigError, match=r"^checkpoint\.fast_aio\.keep_last=-1 is not allowed"):
        parse_fast_aio({"fast_aio": {"keep_last": -1, "verify": "md5"}})


def test_auto_is_refused_not_replaced_by_the_default():
    # DeepSpeedConfigModel drops "auto" values unless parsed strictly; a user's "auto" must not silently mean 0.
    with pytest.raises(ConfigError, match="checkpoint.fast_aio.io_buffer_size='auto' is not allowed"):
        parse_fast_aio({"fast_aio": {"io_buffer_size": "auto"}})


@pytest.mark.parametrize("section, unknown", [
    ({"keep_lst": 3}, "'keep_lst'"),
    ({"zeta": 1, "alpha": 2, "keep_last": 1}, "'alpha', 'zeta'"),
    ({"async_save": True}, "'async_save'"),  # the attribute's name; users write "async"
])
def test_unknown_keys_are_named_with_the_allowed_ones(section, unknown):
    with pytest.raises(ConfigError) as raised:
        parse_fast_aio({"fast_aio": section})
    assert str(raised.value) == (
        f"checkpoint.fast_aio has unknown key(s) {unknown}: allowed keys are keep_last, keep_every, fsync, verify, "
        f"fd_audit, io_buffer_size, torch_crc32, trusted_pickles, skip_damaged_on_resume, background_delete, "
        f"recycle_retired, parallel_writers, async, snapshot, snapshot_max_bytes, async_timeout_s, commit_timeout_s, "
        f"replicate")


@pytest.mark.parametrize("section", [[1, 2], "fast", 3, True, ("keep_last", 1)])
def test_a_section_that_is_not_an_object_is_refused(section):
    with pytest.raises(ConfigError) as raised:
        parse_fast_aio({"fast_aio": section})
    assert str(raised.value) == f"checkpoint.fast_aio={section!r} is not allowed: it must be an object of options"


@pytest.mark.parametrize("section, name", [({}, "torch"), ({"engine": "torch"}, "torch"),
                                           ({"engine": "fast_aio"}, "fast_aio")])
def test_engine_name(section, name):
    assert engine_name(section) == name


@pytest.mark.parametrize("name", ["fastaio", "FAST_AIO", "", None, 1])
def test_unknown_engine_name_is_refused(name):
    with pytest.raises(ConfigError) as raised:
        engine_name({"engine": name})
    assert str(raised.value) == (f"checkpoint.engine={name!r} is not allowed: use one of 'fast_aio', 'torch' "
                                 f"(\"fast_aio\" needs 'import ds_fastckpt')")


def test_io_buffer_size_is_bounded_by_physical_memory(one_rank_per_node):
    limit = max_io_buffer_size()
    assert limit == int(physical_memory() * 0.5) // 2 // 4096 * 4096
    assert parse_fast_aio({"fast_aio": {"io_buffer_size": limit}}).io_buffer_size == limit
    with pytest.raises(ConfigError) as raised:
        parse_fast_aio({"fast_aio": {"io_buffer_size": limit + 4096}})
    message = str(raised.value)
    assert message.startswith(f"checkpoint.fast_aio.io_buffer_size={limit + 4096} is not allowed on this host: it "
                              f"must be at most {limit} bytes.")
    assert f"all 1 rank(s) on this node may take at most 50% of its {physical_memory()} bytes of physical memory" \
        in message


def test_io_buffer_size_limit_is_shared_by_the_ranks_of_a_node(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert max_io_buffer_size() == int(physical_memory() * 0.5) // 16 // 4096 * 4096
    with pytest.raises(ConfigError, match="all 8 rank\\(s\\) on this node"):
        parse_fast_aio({"fast_aio": {"io_buffer_size": max_io_buffer_size() + 4096}})


def test_io_buffer_size_host_check_can_be_left_out_to_read_another_hosts_config():
    assert parse_fast_aio({"fast_aio": {"io_buffer_size": 2**45}}, check_host=False).io_buffer_size == 2**45
    with pytest.raises(ConfigError, match="io_buffer_size=1000 is not allowed: it must be a positive multiple"):
        parse_fast_aio({"fast_aio": {"io_buffer_size": 1000}}, check_host=False)


# --- DeepSpeed's "aio" section: AioTuning ---


def test_aio_tuning_defaults_are_deepspeeds():
    assert AioTuning() == DEFAULT_TUNING
    assert (DEFAULT_TUNING.block_size, DEFAULT_TUNING.queue_depth) == (AIO_BLOCK_SIZE_DEFAULT, AIO_QUEUE_DEPTH_DEFAULT)
    expected = {"block_size": AIO_BLOCK_SIZE_DEFAULT, "queue_depth": AIO_QUEUE_DEPTH_DEFAULT}
    assert aio_tuning({}) == expected
    assert aio_tuning(AIO_DEFAULT_DICT) == expected  # what DeepSpeed parses when the config has no "aio"


@pytest.mark.parametrize("aio", [
    {"block_size": 4096, "queue_depth": 1},
    {"block_size": 262144, "queue_depth": 4},
    {"block_size": 1 << 24, "queue_depth": 32, "intra_op_parallelism": 2, "single_submit": True},
])
def test_aio_tuning_accepts(aio):
    assert aio_tuning(aio) == {"block_size": aio["block_size"], "queue_depth": aio["queue_depth"]}


@pytest.mark.parametrize("block_size", [0, -4096, 1000, 4095, 4096 + 512, 4096.0, "4096", True, None])
def test_aio_block_size_refused(block_size):
    with pytest.raises(ConfigError) as raised:
        aio_tuning({"block_size": block_size})
    assert str(raised.value) == (f"aio.block_size={block_size!r} is not allowed with checkpoint engine fast_aio: "
                                 f"it must be a positive multiple of 4096")


@pytest.mark.parametrize("queue_depth", [0, -1, 2.5, 8.0, "8", True, None])
def test_aio_queue_depth_refused(queue_depth):
    with pytest.raises(ConfigError) as raised:
        aio_tuning({"queue_depth": queue_depth})
    assert str(raised.value) == (f"aio.queue_depth={queue_depth!r} is not allowed with checkpoint engine fast_aio: "
                                 f"it must be a positive integer, at most {MAX_QUEUE_DEPTH}")


def test_queue_depth_is_bounded_by_aio_max_nr(one_rank_per_node):
    events = aio_max_nr()
    if events is None:
        pytest.skip("/proc/sys/fs/aio-max-nr cannot be read here")
    limit = max_queue_depth()
    assert limit == min(MAX_QUEUE_DEPTH, events // 2)
    assert aio_tuning({"queue_depth": limit})["queue_depth"] == limit
    for too_deep in (limit + 1, events + 1, MAX_QUEUE_DEPTH + 1, 2**31):
        with pytest.raises(ConfigError) as raised:
            aio_tuning({"queue_depth": too_deep})
        assert str(raised.value).startswith(f"aio.queue_depth={too_deep} is not allowed with checkpoint engine "
                                            f"fast_aio on this host: it must be at most {limit}.")


def test_queue_depth_message_names_aio_max_nr_and_the_ranks(tmp_path, monkeypatch):
    fake = tmp_path / "aio-max-nr"
    fake.write_text("1000\n")
    monkeypatch.setattr(config_module, "AIO_MAX_NR_PATH", str(fake))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert max_queue_depth() == 125  # 1000 events, 4 ranks, 2 queues each
    assert aio_tuning({"queue_depth": 125})["queue_depth"] == 125
    with pytest.raises(ConfigError, match=re.escape(
            f"aio.queue_depth=126 is not allowed with checkpoint engine fast_aio on this host: it must be at most "
            f"125. The kernel's fs.aio-max-nr ({fake}) is 1000: libaio events all processes on this host may hold "
            f"together, and each of the 4 rank(s) on this node may hold 2 queues of queue_depth events, so a deeper "
            f"queue fails in io_setup with EAGAIN at the first save.")):
        aio_tuning({"queue_depth": 126})


def test_queue_depth_without_aio_max_nr_is_bounded_by_the_op(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "AIO_MAX_NR_PATH", str(tmp_path / "missing"))
    assert max_queue_depth() == MAX_QUEUE_DEPTH
    assert aio_tuning({"queue_depth": MAX_QUEUE_DEPTH})["queue_depth"] == MAX_QUEUE_DEPTH
    for too_deep in (MAX_QUEUE_DEPTH + 1, 2**31):
        with pytest.raises(ConfigError, match=f"aio.queue_depth={too_deep} is not allowed with checkpoint engine "
                                              f"fast_aio on this host: it must be at most 65536. 65536 is the deepest "
                                              f"queue the op accepts"):
            aio_tuning({"queue_depth": too_deep})


# --- The native layer's checks, from the same declarations (AioFileWriter and StagingBuffer call these) ---


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_size=1000), "block_size=1000 is not allowed: it must be a positive multiple of 4096"),
    (dict(block_size=True), "block_size=True is not allowed: it must be a positive multiple of 4096"),
    (dict(block_size=0), "block_size=0 is not allowed: it must be a positive multiple of 4096"),
    (dict(queue_depth=0), "queue_depth=0 is not allowed: it must be a positive integer, at most 65536"),
    (dict(queue_depth=2.5), "queue_depth=2.5 is not allowed: it must be a positive integer, at most 65536"),
    (dict(queue_depth=65537), "queue_depth=65537 is not allowed: it must be a positive integer, at most 65536"),
    (dict(block_size=1000, queue_depth=0), "block_size=1000 is not allowed"),
])
def test_check_tuning_names_the_argument(kwargs, message):
    with pytest.raises(NotAllowed) as raised:
        check_tuning(**kwargs)
    assert str(raised.value).startswith(message)
    assert isinstance(raised.value, ValueError)


def test_check_tuning_accepts_and_fills_defaults():
    assert check_tuning() == DEFAULT_TUNING
    assert check_tuning(queue_depth=MAX_QUEUE_DEPTH) == AioTuning(block_size=AIO_BLOCK_SIZE_DEFAULT,
                                                                  queue_depth=MAX_QUEUE_DEPTH)


@pytest.mark.parametrize("io_buffer_size", [0, -4096, 4095, 4096.0, "4096", True, None])
def test_check_io_buffer_size_names_the_argument(io_buffer_size):
    with pytest.raises(NotAllowed) as raised:
        check_io_buffer_size(io_buffer_size)
    assert str(raised.value) == (f"io_buffer_size={io_buffer_size!r} is not allowed: it must be a positive multiple "
                                 f"of 4096")


def test_check_io_buffer_size_accepts():
    assert check_io_buffer_size(4096) == 4096
    assert check_io_buffer_size(DEFAULT_IO_BUFFER_SIZE) == DEFAULT_IO_BUFFER_SIZE
