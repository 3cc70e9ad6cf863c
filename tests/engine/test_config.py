"""Bad checkpoint config fails inside deepspeed.initialize with the key, the value and what is allowed."""

import re

import pytest

from ds_fastckpt import ConfigError
from ds_fastckpt.engine import config as config_module
from ds_fastckpt.engine.config import (MAX_QUEUE_DEPTH, aio_max_nr, aio_tuning, max_io_buffer_size, max_queue_depth,
                                       parse_fast_aio, physical_memory)
from ds_fastckpt.native import staging
from tests.ds_helpers import init_engine


@pytest.mark.parametrize("fast_aio, message", [
    ({"keep_last": -1}, "checkpoint.fast_aio.keep_last=-1 is not allowed: it must be an integer >= 0"),
    ({"keep_every": -5}, "checkpoint.fast_aio.keep_every=-5 is not allowed"),
    ({"keep_last": "3"}, "checkpoint.fast_aio.keep_last='3' is not allowed"),
    ({"verify": "md5"}, "checkpoint.fast_aio.verify='md5' is not allowed: it must be one of 'off', 'size', 'checksum'"),
    ({"fd_audit": "loud"}, "checkpoint.fast_aio.fd_audit='loud' is not allowed: it must be one of 'raise', 'warn'"),
    ({"fsync": "yes"}, "checkpoint.fast_aio.fsync='yes' is not allowed: it must be true or false"),
    ({"io_buffer_size": 1000}, "checkpoint.fast_aio.io_buffer_size=1000 is not allowed: it must be a positive "
     "multiple of 4096"),
    ({"io_buffer_size": 0}, "checkpoint.fast_aio.io_buffer_size=0 is not allowed"),
    ({"io_buffer_size": 2**45}, "checkpoint.fast_aio.io_buffer_size=35184372088832 is not allowed on this host: it "
     "must be at most"),
    ({"commit_timeout_s": 0}, "checkpoint.fast_aio.commit_timeout_s=0 is not allowed: it must be a finite number"),
    ({"commit_timeout_s": float("nan")}, "checkpoint.fast_aio.commit_timeout_s=nan is not allowed"),
    ({"keep_lst": 3}, "checkpoint.fast_aio has unknown key\\(s\\) 'keep_lst': allowed keys are keep_last"),
    ([1, 2], "checkpoint.fast_aio=\\[1, 2\\] is not allowed: it must be an object"),
])
def test_bad_fast_aio_values(fast_aio, message):
    with pytest.raises(ConfigError, match=message):
        init_engine(1, fast_aio)


def test_unknown_engine_name():
    with pytest.raises(ConfigError, match="checkpoint.engine='fastaio' is not allowed: use one of 'fast_aio', 'torch'"):
        init_engine(1, {}, engine="fastaio")


def test_fast_aio_with_deepspeed_writer_is_refused():
    with pytest.raises(ConfigError, match="checkpoint.writer selects DeepSpeed's own FastCheckpointEngine"):
        init_engine(1, {}, checkpoint={"engine": "fast_aio", "writer": {"type": "fast"}})


@pytest.mark.parametrize("aio, message", [
    ({"block_size": 1000}, "aio.block_size=1000 is not allowed with checkpoint engine fast_aio"),
    ({"queue_depth": 0}, "aio.queue_depth=0 is not allowed: it must be a positive integer"),
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


@pytest.fixture
def one_rank_per_node(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)


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


def test_queue_depth_is_bounded_by_aio_max_nr(one_rank_per_node):
    events = aio_max_nr()
    if events is None:
        pytest.skip("/proc/sys/fs/aio-max-nr cannot be read here")
    limit = max_queue_depth()
    assert limit == min(MAX_QUEUE_DEPTH, events // 2)
    assert aio_tuning({"queue_depth": limit})["queue_depth"] == limit
    for too_deep in (limit + 1, events + 1, 2**31):
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
    with pytest.raises(ConfigError, match="it must be at most 65536. 65536 is the deepest queue the op accepts"):
        aio_tuning({"queue_depth": MAX_QUEUE_DEPTH + 1})


def test_staging_is_allocated_when_the_engine_is_created(monkeypatch):
    def no_memory(nbytes):
        raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {nbytes} bytes")

    monkeypatch.setattr(staging, "_allocate", no_memory)
    with pytest.raises(MemoryError, match=re.escape(
            f"cannot allocate the staging buffer for io_buffer_size={1 << 20}: {(2 << 20) + 4096} bytes of host "
            f"memory are needed")):
        init_engine(1, {"io_buffer_size": 1 << 20})
