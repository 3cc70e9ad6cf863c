"""GPU tests: skipped, with the reason, on a host without CUDA (or without libaio for the op)."""

from pathlib import Path

import pytest
import torch

from tests.ds_helpers import single_process_env

_HERE = Path(__file__).resolve().parent


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    from ds_fastckpt.native.op_builder import FastCkptBuilder

    if not FastCkptBuilder().is_compatible():
        return "the native op needs libaio (apt-get install libaio-dev)"
    return None


def pytest_collection_modifyitems(config, items):
    """Marks every test of this folder skipped before any fixture runs: no op is built or loaded on a CPU host."""
    mine = [item for item in items if _HERE in Path(item.path).resolve().parents]
    reason = _skip_reason() if mine else None
    if reason is not None:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True, scope="session")
def deepspeed_world_of_one():
    single_process_env()


@pytest.fixture(autouse=True)
def check_fd_leaks(no_fd_leaks):
    """Tests here use the op: each ends with its descriptors closed (``no_fd_leaks`` in tests/conftest.py)."""
