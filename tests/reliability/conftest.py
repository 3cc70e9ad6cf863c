import pytest

from tests.ds_helpers import single_process_env


@pytest.fixture(autouse=True, scope="session")
def deepspeed_world_of_one():
    single_process_env()


@pytest.fixture(autouse=True)
def check_fd_leaks(no_fd_leaks):
    """Tests here use the op: each ends with its descriptors closed (``no_fd_leaks`` in tests/conftest.py)."""
