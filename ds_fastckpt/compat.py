"""The DeepSpeed releases ds_fastckpt works with, checked when the package is imported.

The engine hooks DeepSpeed internals that are no public API: ``create_checkpoint_engine``
and the keyword arguments DeepSpeed hands it (``groups``, ``zero_stage``, ``has_moe_layers``),
``CheckpointCommitInfo``, ``DeepSpeedEngine._get_ckpt_name`` and the decoupled commit at the
next gradient-accumulation boundary. An older release lacks some of them and would fail far
from the cause, in the middle of a save, and a few later ones cannot go on training after a
failed async save; ``import ds_fastckpt`` stops first with one message that names the installed
and the needed versions. ``DEEPSPEED_REQUIREMENT`` must equal ``install_requires`` in setup.py;
``make test-compat`` runs a test subset against releases in that range.
"""

import re
from importlib import metadata
from typing import Optional, Tuple

# The first release with every internal the engine hooks (0.17.0 has no CheckpointCommitInfo and no
# create_checkpoint_engine).
MIN_DEEPSPEED = "0.17.1"
# Releases the engine cannot keep training on: their ZeRO stage 1/2 optimizer raises TypeError in the next
# backward() after a step() that raised, and step() is where DeepSpeed commits a decoupled (async) checkpoint,
# so a failed async save stops the run instead of being reported. DeepSpeed 0.18.3 fixed it.
BROKEN_DEEPSPEED = ("0.17.6", "0.18.0", "0.18.1", "0.18.2")
# What setup.py's install_requires says; tests/unit/test_compat.py checks that the two agree.
DEEPSPEED_REQUIREMENT = "deepspeed>=" + ",!=".join((MIN_DEEPSPEED,) + BROKEN_DEEPSPEED)
_FIX = "pip install 'deepspeed>=0.18.3'"


class DeepSpeedVersionError(ImportError):
    """The installed DeepSpeed is older than ``MIN_DEEPSPEED`` or one of ``BROKEN_DEEPSPEED``."""


def installed_deepspeed_version() -> Optional[str]:
    """The installed DeepSpeed's version; None when DeepSpeed cannot be imported.

    Read from the package metadata, which costs no import; a DeepSpeed on ``sys.path`` without metadata
    (a source checkout) is asked for its ``__version__``.
    """
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        pass
    try:
        import deepspeed
    except ImportError:
        return None
    return getattr(deepspeed, "__version__", None)


def check_deepspeed_version(installed: Optional[str] = None) -> None:
    """Stops when DeepSpeed is a release ds_fastckpt does not work with: ``DEEPSPEED_REQUIREMENT``.

    Args:
        installed: the version to check; the installed DeepSpeed's when None.

    Raises:
        DeepSpeedVersionError: DeepSpeed is older than ``MIN_DEEPSPEED`` or one of ``BROKEN_DEEPSPEED``; the
            message names the installed and the needed versions, why, and the pip command that fixes it. A
            missing DeepSpeed is left to the ``ModuleNotFoundError`` of the import that needs it.
    """
    if installed is None:
        installed = installed_deepspeed_version()
    release = None if installed is None else _release(installed)
    if release is None:
        return  # missing, or a version we cannot read (a fork's own scheme): let it run rather than guess
    if release < _release(MIN_DEEPSPEED):
        raise DeepSpeedVersionError(f"ds_fastckpt needs {DEEPSPEED_REQUIREMENT}, but deepspeed {installed} is "
                                    f"installed: run {_FIX}. Releases before {MIN_DEEPSPEED} lack the DeepSpeed "
                                    "internals ds_fastckpt hooks (create_checkpoint_engine, CheckpointCommitInfo, "
                                    "the decoupled commit)")
    if release in {_release(broken) for broken in BROKEN_DEEPSPEED}:
        raise DeepSpeedVersionError(f"ds_fastckpt needs {DEEPSPEED_REQUIREMENT}, but deepspeed {installed} is "
                                    f"installed: run {_FIX}. In DeepSpeed {BROKEN_DEEPSPEED[0]} to "
                                    f"{BROKEN_DEEPSPEED[-1]}, ZeRO stage 1/2 raises TypeError in the backward after "
                                    "a step() that raised, so a failed async save would stop training instead of "
                                    "being reported")


def _release(version: str) -> Optional[Tuple[int, int, int]]:
    """``(major, minor, patch)`` of a version string; a suffix ("+abc1234", "rc1", ".dev0") does not count.

    Parsed here rather than with ``packaging``, which is no requirement of ours: only DeepSpeed brings it in.
    """
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)
