"""Which checkpoint ``load_checkpoint(dir)`` resumes from when no tag is given.

The manifests, not ``latest``, say what is complete: ``latest`` is only a
hint, since a crash can leave it missing, empty, stale or naming a checkpoint
that never finished. The newest complete checkpoint by commit order wins; one
warning says so whenever that is not simply what ``latest`` names.
"""

import logging
from pathlib import Path
from typing import Optional, Tuple

from .records import complete_checkpoints, scan

logger = logging.getLogger(__name__)

LATEST_NAME = "latest"


def read_latest(save_dir: Path) -> Optional[str]:
    """The tag ``latest`` names, or None when it is missing, empty or unreadable."""
    try:
        text = (save_dir / LATEST_NAME).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def choose_resume_tag(save_dir) -> Tuple[Optional[str], str]:
    """The tag to resume from and why; (None, reason) when there is no complete checkpoint.

    Logs one warning when the choice differs from what ``latest`` says.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None, f"{save_dir} does not exist"
    latest = read_latest(save_dir)
    complete = complete_checkpoints(scan(save_dir))
    if not complete:
        return None, f"{save_dir} holds no complete ds_fastckpt checkpoint"
    newest = complete[-1].tag
    if latest == newest:
        return newest, f"'latest' names {newest}, the newest complete checkpoint"
    if latest is None:
        why = "'latest' is missing or empty"
    elif latest in {record.tag for record in complete}:
        why = f"'latest' names {latest!r}, an older checkpoint than the newest complete one"
    else:
        why = f"'latest' names {latest!r}, which is not a complete checkpoint"
    reason = f"{why}; resuming from {newest!r}, the newest complete checkpoint in {save_dir}"
    logger.warning(reason)
    return newest, reason
