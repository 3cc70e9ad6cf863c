import pytest


@pytest.fixture(autouse=True)
def check_fd_leaks(no_fd_leaks):
    """Tests here use the op: each ends with its descriptors closed (``no_fd_leaks`` in tests/conftest.py)."""
