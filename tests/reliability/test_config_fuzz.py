"""Any fast_aio or aio section either gives a config or the documented ConfigError: never another exception."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_fastckpt import ConfigError, FastAioConfig
from ds_fastckpt.engine.config import aio_tuning, parse_fast_aio
from tests.ds_helpers import init_engine

KEYS = ["keep_last", "keep_every", "fsync", "verify", "fd_audit", "io_buffer_size", "torch_crc32", "trusted_pickles",
        "async", "snapshot", "async_timeout_s", "commit_timeout_s",
        "skip_damaged_on_resume"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                   st.text(max_size=8), st.sampled_from(["off", "size", "checksum", "raise", "warn", 4096, 1 << 20]),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
SECTIONS = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6),
    st.dictionaries(st.text(max_size=10), VALUES, max_size=3),
    VALUES,
)


@settings(max_examples=400, deadline=None)
@given(section=SECTIONS)
def test_parse_gives_a_config_or_a_config_error(section):
    try:
        config = parse_fast_aio({"fast_aio": section})
    except ConfigError as error:
        assert "checkpoint.fast_aio" in str(error) and "allowed" in str(error)
    else:
        assert isinstance(config, FastAioConfig)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.dictionaries(st.sampled_from(KEYS[:6]), VALUES, max_size=3))
def test_initialize_gives_an_engine_or_a_config_error(section):
    try:
        engine = init_engine(1, section)
    except ConfigError:
        with pytest.raises(ConfigError):
            parse_fast_aio({"fast_aio": section})
    else:
        assert engine.checkpoint_engine.options == parse_fast_aio({"fast_aio": section})


@settings(max_examples=300, deadline=None)
@given(section=st.dictionaries(st.sampled_from(["block_size", "queue_depth", "intra_op_parallelism"]), VALUES,
                               max_size=3))
def test_aio_tuning_gives_the_writer_arguments_or_a_config_error(section):
    try:
        tuning = aio_tuning(section)
    except ConfigError as error:
        assert str(error).startswith("aio.") and "is not allowed" in str(error)
    else:
        assert set(tuning) == {"block_size", "queue_depth"}
        assert tuning["block_size"] > 0 and tuning["block_size"] % 4096 == 0 and tuning["queue_depth"] >= 1
