import pytest

from tests.ds_helpers import single_process_env


@pytest.fixture(autouse=True, scope="session")
def deepspeed_world_of_one():
    single_process_env()
