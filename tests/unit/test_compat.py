"""The DeepSpeed version check run by ``import ds_fastckpt``: given version strings, no other DeepSpeed installed."""

import re
from pathlib import Path

import pytest

from ds_fastckpt.compat import (BROKEN_DEEPSPEED, DEEPSPEED_REQUIREMENT, MIN_DEEPSPEED, DeepSpeedVersionError,
                                check_deepspeed_version, installed_deepspeed_version)

SETUP_PY = Path(__file__).resolve().parents[2] / "setup.py"


def test_an_older_deepspeed_is_refused_with_both_versions_and_the_fix():
    with pytest.raises(DeepSpeedVersionError) as caught:
        check_deepspeed_version("0.17.0")
    message = str(caught.value)
    assert "deepspeed 0.17.0 is installed" in message
    assert f"needs {DEEPSPEED_REQUIREMENT}" in message
    assert "pip install 'deepspeed>=0.18.3'" in message
    assert "CheckpointCommitInfo" in message


@pytest.mark.parametrize("version", BROKEN_DEEPSPEED)
def test_a_release_that_cannot_go_on_after_a_failed_async_save_is_refused(version):
    with pytest.raises(DeepSpeedVersionError) as caught:
        check_deepspeed_version(version)
    message = str(caught.value)
    assert f"deepspeed {version} is installed" in message
    assert "pip install 'deepspeed>=0.18.3'" in message
    assert "failed async save" in message


def test_the_error_is_an_import_error():
    # `import ds_fastckpt` fails, so callers that guard optional imports with `except ImportError` still work.
    assert issubclass(DeepSpeedVersionError, ImportError)


@pytest.mark.parametrize("version", ["0.16.9", "0.9.5", "0.17.0+cu121", "0.18.1+abc1234"])
def test_releases_outside_the_range_are_refused_whatever_their_suffix(version):
    with pytest.raises(DeepSpeedVersionError, match=re.escape(version)):
        check_deepspeed_version(version)


@pytest.mark.parametrize("version", [MIN_DEEPSPEED, "0.17.5", "0.18.3", "0.19.8", "0.19.8+abc1234", "0.20.0", "1.0",
                                     "0.19.9.dev0"])
def test_releases_in_the_range_pass(version):
    check_deepspeed_version(version)


def test_a_version_it_cannot_read_is_let_through():
    check_deepspeed_version("unknown")


def test_the_installed_deepspeed_passes():
    # The test environment's own DeepSpeed is within the range, or importing ds_fastckpt would have failed.
    assert installed_deepspeed_version() is not None
    check_deepspeed_version()


def test_the_requirement_is_what_setup_py_declares():
    assert DEEPSPEED_REQUIREMENT == "deepspeed>=0.17.1,!=0.17.6,!=0.18.0,!=0.18.1,!=0.18.2"
    assert f'"{DEEPSPEED_REQUIREMENT}"' in SETUP_PY.read_text(encoding="utf-8")
