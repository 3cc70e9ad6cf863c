"""Which checkpoint ``load_checkpoint(dir)`` resumes from when no tag is given.

What DeepSpeed means: the checkpoint ``latest`` names, whenever it is
complete (its manifest says so) and intact. A save with ``save_latest=False``
(an evaluation snapshot, a "best" copy) is therefore never resumed from by
accident, and a save killed between its rename and ``latest`` is not resumed
either, as it never returned. Only when ``latest`` is missing, unreadable, or
names something absent, incomplete or damaged does the newest complete
checkpoint by commit order win, with one warning saying why. The one exception
is a run switched to fast_aio: ``latest`` naming a directory another engine
wrote after our newest commit is resumed from, with a warning.
"""

import logging
import os
import stat
from pathlib import Path
from typing import Callable, Optional, Tuple

from ds_fastckpt.format.integrity import CheckpointIntegrityError
from ds_fastckpt.format.names import LATEST_NAME, MANIFEST_NAME
from ds_fastckpt.format.records import CheckpointRecord, complete_checkpoints, scan
from ds_fastckpt.format.small_files import excerpt, read_small_file
from ds_fastckpt.format.tags import tag_problem

logger = logging.getLogger(__name__)

SKIP_OPTION = "checkpoint.fast_aio.skip_damaged_on_resume"


def read_latest(save_dir: Path) -> Optional[str]:
    """The tag ``latest`` names, or None when it is missing, empty or unreadable.

    ``latest`` is a hint anyone may have written, so it is read as untrusted
    (``small_files``): a FIFO, a symlink, a device, more than 4096 bytes,
    text that is not UTF-8, or text that breaks the tag rule
    (``tags.tag_problem``, the rule every saved tag passed) counts as
    unreadable, with a warning that quotes an excerpt at most. Surrounding
    whitespace is stripped first, as DeepSpeed does.
    """
    path = Path(save_dir) / LATEST_NAME
    try:
        raw = read_small_file(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        logger.warning("ignoring %s: %s", path, error.strerror or error)
        return None
    try:
        text = raw.decode().strip()
    except UnicodeDecodeError:
        logger.warning("ignoring %s: it is not UTF-8 text: %s", path, excerpt(raw))
        return None
    if not text:
        return None
    problem = tag_problem(text)
    if problem is not None:
        logger.warning("ignoring %s: it does not hold one checkpoint tag (%s): %s", path, problem, excerpt(text))
        return None
    return text


def choose_resume_tag(save_dir, damage_of: Optional[Callable[[CheckpointRecord], Optional[str]]] = None
                      ) -> Tuple[Optional[str], str]:
    """The tag to resume from and why; (None, reason) when there is no complete checkpoint.

    The complete checkpoint ``latest`` names, when it is intact; otherwise the
    newest complete one by commit order, with one warning saying why.
    ``damage_of`` (given with ``skip_damaged_on_resume``) says why a
    checkpoint is damaged, or None: checkpoints are then tried ``latest``'s
    first, then newest first, and damaged ones, and those whose manifest
    cannot be read, are skipped with a warning naming the damage. Without it,
    when ``latest`` does not name a complete checkpoint, a manifest that cannot
    be read stops the resume, since its checkpoint may be newer than every
    readable one and resuming would silently go back past it.

    Raises:
        CheckpointIntegrityError: for a manifest that cannot be read, without ``damage_of``.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None, f"{save_dir} does not exist"
    records = scan(save_dir)
    skipped = {record.tag: record.damaged for record in records if record.damaged}
    latest = read_latest(save_dir)
    named = next((record for record in records if record.complete and record.tag == latest), None)
    if named is not None:
        damage = damage_of(named) if damage_of is not None else None
        if damage is None:
            return latest, f"'latest' names {latest!r}, a complete checkpoint"
        skipped[latest] = damage
    if skipped and damage_of is None:
        raise CheckpointIntegrityError(f"{next(iter(skipped.values()))}; not resuming from an older checkpoint past "
                                       f"it: repair or remove that directory, pass a tag, or set {SKIP_OPTION}=true")
    newest = None
    for record in reversed(complete_checkpoints(records)):
        if record.tag in skipped:
            continue
        damage = damage_of(record) if damage_of is not None else None
        if damage is None:
            newest = record.tag
            break
        skipped[record.tag] = damage
    for damage in skipped.values():
        logger.warning("skipping a damaged checkpoint (%s=true): %s", SKIP_OPTION, damage)
    if newest is None and skipped:
        raise CheckpointIntegrityError(f"every checkpoint in {save_dir} is damaged; the newest: "
                                       f"{next(iter(skipped.values()))}")
    foreign = _newer_foreign_checkpoint(save_dir, latest, records, newest)
    if foreign is not None:
        reason = (f"'latest' names {latest!r}, a checkpoint written by another checkpoint engine (no "
                  f"{MANIFEST_NAME}), newer than any ds_fastckpt checkpoint in {save_dir}: resuming from it; its "
                  "files carry no checksums and are not verified")
        logger.warning(reason)
        return latest, reason
    if newest is None:
        return None, f"{save_dir} holds no complete ds_fastckpt checkpoint"
    if latest is None:
        why = "'latest' is missing, empty or unreadable"
    elif latest in skipped:
        why = f"'latest' names {latest!r}, which is damaged"
    else:
        why = f"'latest' names {latest!r}, which is not a complete checkpoint"
    reason = f"{why}; resuming from {newest!r}, the newest complete checkpoint in {save_dir}"
    logger.warning(reason)
    return newest, reason


def _newer_foreign_checkpoint(save_dir: Path, latest: Optional[str], records, newest: Optional[str]
                              ) -> Optional[Path]:
    """The directory ``latest`` names when another engine wrote it after our newest checkpoint, else None.

    A run switched to fast_aio from DeepSpeed's default engine has tag
    directories without a manifest and a ``latest`` naming one of them.
    Such a directory, if it holds a model states file as every DeepSpeed
    checkpoint does, is resumed from unless one of ours was committed after
    it was last written to; it is never ours, so rotation leaves it alone.
    """
    if latest is None:  # read_latest returns tags that pass the tag rule only
        return None
    candidate = save_dir / latest
    try:
        info = os.lstat(candidate)
    except (OSError, ValueError):
        return None
    if (not stat.S_ISDIR(info.st_mode) or os.path.lexists(candidate / MANIFEST_NAME)
            or not _has_model_states(candidate)):
        return None
    ours = {record.tag: record for record in records if record.complete}
    if newest is not None and ours[newest].manifest.committed_unix_ns >= info.st_mtime_ns:
        return None
    return candidate


def _has_model_states(tag_dir: Path) -> bool:
    """Whether ``tag_dir`` holds a DeepSpeed model states file (``*model_states.pt``), as a regular file."""
    try:
        with os.scandir(tag_dir) as entries:
            return any(entry.name.endswith("model_states.pt") and entry.is_file(follow_symlinks=False)
                       for entry in entries)
    except OSError:
        return False


class PendingCheckpointError(FileNotFoundError):
    """A checkpoint asked for was never committed: only its pending directory exists.

    An async save (``"async": true``) is committed at the next optimizer step;
    a process that ends before then leaves ``.<tag>.ds_fastckpt-tmp`` and no
    ``<tag>``. The message says so and what to load instead.

    Attributes:
        folder: the directory the checkpoint was to be in (DeepSpeed's ``load_dir``).
        tag: the checkpoint's tag.
        pending_dir: the directory holding its uncommitted files.
        instead: what to load instead (a folder or a tag), or None when nothing complete was found.
    """

    def __init__(self, message: str, folder: Path, tag: str, pending_dir: Path, instead: Optional[str] = None):
        super().__init__(message)
        self.folder = Path(folder)
        self.tag = tag
        self.pending_dir = Path(pending_dir)
        self.instead = instead


def uncommitted_tags(save_dir, tags=None) -> "list[str]":
    """Tags in ``save_dir`` that exist only as our pending directory (a save never committed), sorted.

    Args:
        save_dir: a DeepSpeed save_dir.
        tags: the tags to look at (an iterable of str); None for every pending tag in ``save_dir``.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = {record.tag for record in scan(save_dir) if record.leftover == "pending"}
    if tags is not None:
        found &= set(tags)
    return sorted(tag for tag in found if not os.path.lexists(save_dir / tag))


def pending_checkpoint_error(save_dir, tag: str, instead: Optional[str], what_to_do: str) -> PendingCheckpointError:
    """The error for loading ``tag`` from ``save_dir`` when only its pending directory exists.

    Args:
        save_dir: the directory the checkpoint was to be in.
        tag: its tag.
        instead: what to load instead, or None.
        what_to_do: the sentence saying how to load ``instead`` (or what to do without it).
    """
    save_dir = Path(save_dir)
    pending_dir = next((save_dir / record.name for record in scan(save_dir)
                        if record.leftover == "pending" and record.tag == tag), save_dir / f".{tag}")
    message = (f"checkpoint {tag!r} in {save_dir} was never committed: only its pending directory "
               f"{pending_dir.name} is there, because the async save (\"async\": true) was still in flight when "
               "the process that saved it ended (an async checkpoint is committed at the next optimizer step, by "
               f"ds_fastckpt.wait(engine) or at a normal exit). {what_to_do}")
    return PendingCheckpointError(message, save_dir, tag, pending_dir, instead)
