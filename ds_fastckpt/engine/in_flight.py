"""The engines of this process with a checkpoint possibly in flight, and the calls that commit it.

An async save is committed at the next optimizer step; these let code commit
it sooner: with the DeepSpeed engine at hand (``wait``), without it
(``wait_all``, for a training framework's callback), and at interpreter exit.
"""

import atexit
import logging
import weakref

logger = logging.getLogger(__name__)

_live_engines: "weakref.WeakSet" = weakref.WeakSet()


def track(engine) -> None:
    """Registers a fast_aio engine for ``wait``/``wait_all``; with ``commit_at_exit`` also for interpreter exit."""
    _live_engines.add(engine)


def wait_all() -> None:
    """Finishes and commits the checkpoint in flight of every live fast_aio engine in this process.

    For code that does not hold the DeepSpeed engine, such as a training
    framework's callback. Every rank must call it.
    """
    for engine in list(_live_engines):
        engine.wait()


def wait(ds_engine) -> None:
    """Finishes and commits the checkpoint a DeepSpeed engine is writing in the background.

    With ``"async": true`` a checkpoint is committed at the next optimizer
    step; call this to commit it sooner, e.g. before evaluating or exiting
    abnormally. Every rank must call it. Does nothing for other engines or
    when no checkpoint is in flight.

    Raises:
        OSError, CommitError, BackgroundWriterError: when the checkpoint cannot be committed.
    """
    checkpoint_engine = getattr(ds_engine, "checkpoint_engine", None)
    if checkpoint_engine is not None and checkpoint_engine in _live_engines:
        checkpoint_engine.wait()


def commit_at_exit(engine) -> None:
    """Commits an async checkpoint of ``engine`` still in flight when the interpreter exits normally."""
    reference = weakref.ref(engine)

    def commit_in_flight():
        live = reference()
        if live is None:
            return
        try:
            live.wait()
        except Exception:  # the interpreter is exiting: say what was lost, loudly
            logger.exception("ds_fastckpt could not commit the checkpoint in flight at exit")

    atexit.register(commit_in_flight)
