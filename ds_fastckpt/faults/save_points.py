"""Named points of a save, for tests that stop the process there (the kill sweep).

The engine calls ``reached(point)`` at each; it does nothing unless a test
has installed a callback with ``on_reached``.
"""

from typing import Callable, Optional

POINTS = (
    "before_file_close",  # data handed to the writer, file not yet flushed or fsynced
    "after_file_write",  # one file written and fsynced
    "before_commit_record",  # all files durable, manifest not yet written
    "before_publish",  # manifest durable in the pending directory, not yet renamed into place
    "before_latest",  # checkpoint complete, `latest` not yet updated
    "mid_rotation",  # old checkpoints renamed to trash, their files not yet removed
)

_callback: Optional[Callable[[str], None]] = None


def on_reached(callback: Optional[Callable[[str], None]]) -> None:
    """Installs (or, with None, removes) the callback called with each point's name."""
    global _callback
    _callback = callback


def reached(point: str) -> None:
    if _callback is not None:
        _callback(point)
