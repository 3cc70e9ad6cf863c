import os

import pytest

import ds_fastckpt.engine.checkpoint_engine
from ds_fastckpt import AioFileWriter
from tests.ds_helpers import single_process_env


@pytest.fixture(autouse=True, scope="session")
def deepspeed_world_of_one():
    single_process_env()


@pytest.fixture(autouse=True)
def check_fd_leaks(no_fd_leaks):
    """Tests here use the op: each ends with its descriptors closed (``no_fd_leaks`` in tests/conftest.py)."""


@pytest.fixture
def leaky_writer(monkeypatch):
    """A writer that, like FastFileWriter before PR 8005, opens the file again and never closes that fd."""
    leaked = []

    class LeakyWriter(AioFileWriter):

        def __init__(self, path, **kwargs):
            super().__init__(path, **kwargs)
            leaked.append(os.open(path, os.O_RDONLY))

    monkeypatch.setattr(ds_fastckpt.engine.checkpoint_engine, "AioFileWriter", LeakyWriter)
    yield leaked
    for fd in leaked:
        os.close(fd)
