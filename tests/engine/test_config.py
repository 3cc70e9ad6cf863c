"""Bad checkpoint config fails inside deepspeed.initialize with the key, the value and what is allowed.

The parser's full table of accepted and refused values is in tests/unit/test_config_parser.py; these cases
check that its errors surface from ``deepspeed.initialize`` and what the engine does with a good config.
"""

import re

import pytest

from ds_fastckpt import ConfigError
from ds_fastckpt.native import staging
from tests.ds_helpers import init_engine


@pytest.mark.parametrize("fast_aio, message", [
    ({"keep_last": -1}, "checkpoint.fast_aio.keep_last=-1 is not allowed: it must be an integer >= 0 "
     "\\(0 keeps every checkpoint\\)"),
    ({"keep_last": "3"}, "checkpoint.fast_aio.keep_last='3' is not allowed"),
    ({"verify": "md5"}, "checkpoint.fast_aio.verify='md5' is not allowed: it must be one of 'off', 'size', 'checksum'"),
    ({"fsync": "yes"}, "checkpoint.fast_aio.fsync='yes' is not allowed: it must be true or false"),
    ({"io_buffer_size": 1000}, "checkpoint.fast_aio.io_buffer_size=1000 is not allowed: it must be a positive "
     "multiple of 4096"),
    ({"io_buffer_size": 2**45}, "checkpoint.fast_aio.io_buffer_size=35184372088832 is not allowed on this host: it "
     "must be at most"),
    ({"commit_timeout_s": float("nan")}, "checkpoint.fast_aio.commit_timeout_s=nan is not allowed: it must be a "
     "finite number of seconds > 0"),
    ({"keep_lst": 3}, "checkpoint.fast_aio has unknown key\\(s\\) 'keep_lst': allowed keys are keep_last"),
    ([1, 2], "checkpoint.fast_aio=\\[1, 2\\] is not allowed: it must be an object"),
])
def test_bad_fast_aio_values(fast_aio, message):
    with pytest.raises(ConfigError, match=message):
        init_engine(1, fast_aio)


def test_parallel_writers_all_with_node_local_storage_is_refused():
    with pytest.raises(ConfigError, match="parallel_writers='all' writes one copy of the model states from ranks on "
                       "every host, but checkpoint.use_node_local_storage keeps a copy on each host: use 'node'"):
        init_engine(1, checkpoint={"engine": "fast_aio", "use_node_local_storage": True,
                                   "fast_aio": {"parallel_writers": "all"}})


def test_parallel_writers_left_out_with_node_local_storage_is_not_refused():
    """Its default then means "node" (tests/engine/test_two_nodes.py runs it on two simulated hosts)."""
    engine = init_engine(1, checkpoint={"engine": "fast_aio", "use_node_local_storage": True})
    assert engine.checkpoint_engine.node_local and not engine.checkpoint_engine.writes_in_parallel


@pytest.mark.parametrize("stage", [1, 3])
def test_parallel_writers_on_one_rank_leave_deepspeed_s_writer_choice(stage):
    """Alone there is no one to share with: rank 0 saves the model states, as DeepSpeed decides."""
    engine = init_engine(stage, {"parallel_writers": "all"})
    assert not engine.checkpoint_engine.writes_in_parallel
    assert engine.save_non_zero_checkpoint


def test_unknown_engine_name():
    with pytest.raises(ConfigError, match="checkpoint.engine='fastaio' is not allowed: use one of 'fast_aio', 'torch'"):
        init_engine(1, {}, engine="fastaio")


def test_fast_aio_with_deepspeed_writer_is_refused():
    with pytest.raises(ConfigError, match="checkpoint.writer selects DeepSpeed's own FastCheckpointEngine"):
        init_engine(1, {}, checkpoint={"engine": "fast_aio", "writer": {"type": "fast"}})


@pytest.mark.parametrize("aio, message", [
    ({"block_size": 1000}, "aio.block_size=1000 is not allowed with checkpoint engine fast_aio: it must be a "
     "positive multiple of 4096"),
    ({"queue_depth": 0}, "aio.queue_depth=0 is not allowed with checkpoint engine fast_aio: it must be a positive "
     "integer"),
    ({"queue_depth": 2**31}, "aio.queue_depth=2147483648 is not allowed with checkpoint engine fast_aio on this "
     "host: it must be at most"),
])
def test_bad_aio_tuning(aio, message):
    with pytest.raises(ConfigError, match=message):
        init_engine(1, {}, aio=aio)


def test_aio_section_tunes_the_writer():
    engine = init_engine(1, {"io_buffer_size": 1 << 20}, aio={"block_size": 262144, "queue_depth": 4})
    assert engine.checkpoint_engine.tuning == {"block_size": 262144, "queue_depth": 4}
    assert engine.checkpoint_engine.options.io_buffer_size == 1 << 20


def test_staging_is_allocated_when_the_engine_is_created(monkeypatch):
    def no_memory(nbytes):
        raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {nbytes} bytes")

    monkeypatch.setattr(staging, "_allocate", no_memory)
    with pytest.raises(MemoryError, match=re.escape(
            f"cannot allocate the staging buffer for io_buffer_size={1 << 20}: {(2 << 20) + 4096} bytes of host "
            f"memory are needed")):
        init_engine(1, {"io_buffer_size": 1 << 20})
