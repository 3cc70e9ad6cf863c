"""Retrying a remote request through an outage, with backoff, until it succeeds or the caller gives up."""

import logging
import threading
import time
from typing import Callable, Optional, TypeVar

from ds_fastckpt.remote.store import RemoteUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
# An outage is logged when it starts and then at most this often, so a long one does not flood the log.
LOG_EVERY_S = 60.0


class GaveUp(Exception):
    """The caller stopped waiting (``stop`` was set) before the store came back."""


def retry_while_unavailable(request: Callable[[], T], what: str, stop: threading.Event,
                            first_delay_s: float = FIRST_DELAY_S) -> T:
    """``request()``, repeated with exponential backoff while it raises ``RemoteUnavailableError``.

    Any other error is raised at once: bytes that differ, or a local file that
    is gone, do not get better by waiting.

    Raises:
        GaveUp: ``stop`` was set while waiting; the last error is its cause.
    """
    delay, started, logged = first_delay_s, time.monotonic(), None
    while True:
        try:
            result = request()
        except RemoteUnavailableError as error:
            now = time.monotonic()
            if logged is None or now - logged >= LOG_EVERY_S:
                logger.warning("%s: the remote tier is unavailable (for %.0f s now), retrying: %s", what,
                               now - started, error)
                logged = now
            if stop.wait(delay):
                raise GaveUp(f"{what}: gave up after {now - started:.0f} s: {error}") from error
            delay = min(delay * 2, MAX_DELAY_S)
            continue
        if logged is not None:
            logger.warning("%s: the remote tier answers again after %.0f s", what, time.monotonic() - started)
        return result


def first_line(error: Optional[BaseException]) -> str:
    """``error`` in one line, for a report or a log message."""
    return "" if error is None else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
