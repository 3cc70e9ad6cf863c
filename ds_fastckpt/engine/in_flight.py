"""The engines of this process with a checkpoint possibly in flight, and the calls that commit it.

An async save is committed at the next optimizer step; these let code commit
it sooner: with the DeepSpeed engine at hand (``wait``), without it
(``wait_all``, for a training framework's callback, and from the hook on
``torch.distributed.destroy_process_group``: the commit needs the process
group), and at interpreter exit.

Exit paths that must not commit: an uncaught exception (the ranks are no
longer in step, so a commit would wait ``commit_timeout_s`` for ranks that
will never join, and hide the crash from torchrun that long), and the exit of
a child made with ``os.fork()`` (the checkpoint is its parent's, and the
writer thread did not survive the fork). Both leave the checkpoint pending:
the previous complete checkpoint is what resumes.
"""

import atexit
import itertools
import logging
import os
import sys
import weakref

from ds_fastckpt.engine.rank_group import CommitError

logger = logging.getLogger(__name__)

# Engine -> creation number. Ranks create their engines in the same order (collectively), so committing in
# this order pairs each engine's collectives with the same engine's on every rank; engines of the same
# commit_timeout_s share one gloo group.
_live_engines: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_created = itertools.count()
_exception_exit = False  # set by the chained sys.excepthook: the interpreter ends with an uncaught exception


def _note_exception_exit(previous):

    def excepthook(kind, value, traceback):
        global _exception_exit
        _exception_exit = True
        previous(kind, value, traceback)

    excepthook.ds_fastckpt_chained = True
    return excepthook


def _chain_excepthook() -> None:
    if not getattr(sys.excepthook, "ds_fastckpt_chained", False):
        sys.excepthook = _note_exception_exit(sys.excepthook)


def _forget_in_child() -> None:
    """In a forked child: the engines and their checkpoints belong to the parent; nothing of them runs here."""
    global _exception_exit
    _live_engines.clear()
    _exception_exit = False


os.register_at_fork(after_in_child=_forget_in_child)


def track(engine) -> None:
    """Registers a fast_aio engine for ``wait``/``wait_all``; notes an uncaught exception's exit from now on.

    At a normal exit, waits a bounded time (``replicate.wait_timeout_s``) for the engine's uploads to the remote
    tier. Registered before ``commit_at_exit``, so it runs after it (atexit is last in, first out): the checkpoint
    committed at exit is uploaded too.
    """
    _chain_excepthook()
    _live_engines[engine] = next(_created)
    reference, owner = weakref.ref(engine), os.getpid()

    def replicate_at_exit():
        live = reference()
        if live is not None and os.getpid() == owner and live in _live_engines and not _exception_exit:
            live.wait_replication()

    atexit.register(replicate_at_exit)


def _in_flight_engines() -> list:
    """The live async engines of this process, oldest first (a synchronous engine never has one in flight)."""
    engines = sorted(_live_engines.items(), key=lambda item: item[1])
    return [engine for engine, _ in engines if engine.is_decoupled()]


def wait_all() -> None:
    """Finishes and commits the checkpoint in flight of every live fast_aio engine in this process, then waits
    (``replicate.wait_timeout_s`` at most) for their uploads to the remote tier.

    For code that does not hold the DeepSpeed engine, such as a training
    framework's callback. Every rank must call it.
    """
    for engine in _in_flight_engines():
        engine.wait()
    for engine in sorted(_live_engines.keys(), key=_live_engines.get):
        engine.wait_replication()


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


def _describe(engine) -> str:
    info = engine.get_commit_info()
    return f"checkpoint {info.tag!r} in {info.save_dir}"


def commit_at_exit(engine) -> None:
    """Commits an async checkpoint of ``engine`` still in flight when the interpreter exits normally.

    Not after an uncaught exception, not in a forked child, not once the
    process group the checkpoint was saved in is gone: then it stays pending,
    with one warning naming it, and the checkpoint before it is what resumes.
    """
    reference = weakref.ref(engine)
    owner = os.getpid()

    def commit_in_flight():
        live = reference()
        if live is None or os.getpid() != owner or live not in _live_engines or live.get_commit_info() is None:
            return  # nothing in flight, or a forked child: the checkpoint is its parent's
        if _exception_exit:
            logger.warning("ds_fastckpt left %s pending: the process is exiting with an uncaught exception, and "
                           "the other ranks may never join its commit; resume uses the checkpoint before it",
                           _describe(live))
            return
        what = _describe(live)
        try:
            live.wait()
        except CommitError as error:  # the process group is gone, or another rank failed or left
            logger.warning("ds_fastckpt left %s pending at exit; resume uses the checkpoint before it: %s", what,
                           error)
        except Exception:  # the interpreter is exiting: say what was lost, loudly
            logger.exception("ds_fastckpt could not commit %s at exit", what)

    atexit.register(commit_in_flight)
