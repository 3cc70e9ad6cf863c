"""Checkpoint tags become directory names inside save_dir; only safe ones are accepted."""

from typing import Optional

from ds_fastckpt.format.names import LATEST_NAME, PENDING_SUFFIX, TRASH_SUFFIX, tag_of_internal_name

# NAME_MAX: the bytes one directory entry's name may hold on Linux filesystems (ext4, xfs, btrfs, tmpfs, NFS).
NAME_MAX = 255
# The longest name derived from a tag is ".<tag>.ds_fastckpt-trash"; its prefix and suffix are ASCII, one byte
# per character in the ASCII-compatible encodings Linux filesystems are named in.
_LONGEST_AFFIXES = len(".") + max(len(PENDING_SUFFIX), len(TRASH_SUFFIX))
# A tag's limit in bytes of UTF-8 (how Python names files on Linux, and how 'latest' holds the tag), not in
# characters: 236 ASCII characters, but only 118 'é' (two bytes each). Counting characters let a tag of 200 'é'
# through to fail at mkdir.
MAX_TAG_BYTES = NAME_MAX - _LONGEST_AFFIXES


class InvalidTagError(ValueError):
    """A checkpoint tag that cannot name a directory inside save_dir safely."""


RULE = (f"a tag is one directory name of 1 to {MAX_TAG_BYTES} bytes of UTF-8 text, without '/', control "
        f"characters (tab, newline, NUL, ...) or leading or trailing whitespace, not '.', '..' or {LATEST_NAME!r}, "
        "not starting with '.'")
# Why the rule refuses what DeepSpeed's default engine takes: say it, and what to write instead.
_NESTED = ("a tag names one directory directly inside save_dir, where the commit renames it atomically and "
           "rotation finds it; use a single name such as 'epoch_3' instead of 'epoch/3'")
_HIDDEN = ("names starting with '.' are where ds_fastckpt keeps pending, spare and trash directories; drop the "
           "leading '.'")
_LATEST = ("the tag is written to and read back from 'latest' as one line of UTF-8 text (DeepSpeed strips it), so "
           "it must come back unchanged")


def tag_problem(text: str) -> Optional[str]:
    """Why ``text`` cannot be a checkpoint tag, or None when it can.

    The one rule for tags: ``validate_tag`` applies it to what is saved, and
    the ``latest`` reader (``resume.read_latest``) to what it reads back, so a
    tag that is written is always read back as itself.
    """
    if not text or text in (".", "..", LATEST_NAME):
        return "it is empty, '.', '..' or 'latest'"
    if "/" in text:
        return _NESTED
    if text.startswith(".") or tag_of_internal_name(text) is not None:
        return _HIDDEN
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text) or text != text.strip():
        return _LATEST
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return f"this one cannot be encoded in UTF-8; {_LATEST}"
    if size > MAX_TAG_BYTES:
        return f"this one is {size} bytes"
    return None


def validate_tag(tag) -> str:
    """Returns ``tag`` as a string if it is a safe single directory name (``tag_problem``).

    Only the string is checked, never the filesystem, so every rank refuses
    the same tags before anything is created.

    Raises:
        InvalidTagError: naming the tag, what is allowed and why this one is not.
    """
    text = str(tag)
    problem = tag_problem(text)
    if problem is not None:
        raise InvalidTagError(f"checkpoint tag {text!r} is not allowed: {RULE}; {problem}")
    return text
