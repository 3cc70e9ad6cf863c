"""Checkpoint tags become directory names inside save_dir; only safe ones are accepted."""

import os
import sys

from ds_fastckpt.format.names import LATEST_NAME, PENDING_SUFFIX, TRASH_SUFFIX, tag_of_internal_name

# NAME_MAX: the bytes one directory entry's name may hold on Linux filesystems (ext4, xfs, btrfs, tmpfs, NFS).
NAME_MAX = 255
# The longest name derived from a tag is ".<tag>.ds_fastckpt-trash"; its prefix and suffix are ASCII, one byte
# per character in the ASCII-compatible encodings Linux filesystems are named in.
_LONGEST_AFFIXES = len(".") + max(len(PENDING_SUFFIX), len(TRASH_SUFFIX))
# A tag's limit in bytes of the filesystem encoding (UTF-8 here), not in characters: 236 ASCII characters, but
# only 118 'é' (two bytes each). Counting characters let a tag of 200 'é' through to fail at mkdir.
MAX_TAG_BYTES = NAME_MAX - _LONGEST_AFFIXES


class InvalidTagError(ValueError):
    """A checkpoint tag that cannot name a directory inside save_dir safely."""


def validate_tag(tag) -> str:
    """Returns ``tag`` as a string if it is a safe single directory name.

    Only the string is checked, never the filesystem, so every rank refuses
    the same tags before anything is created.

    Raises:
        InvalidTagError: naming the tag and what is allowed.
    """
    text = str(tag)
    allowed = (f"a tag is one directory name of 1 to {MAX_TAG_BYTES} bytes in the filesystem encoding "
               f"({sys.getfilesystemencoding()}), without '/' or NUL, not '.', '..' or {LATEST_NAME!r}, "
               f"not starting with '.'")
    if (not text or text in (".", "..", LATEST_NAME) or "/" in text or "\0" in text or text.startswith(".")
            or tag_of_internal_name(text) is not None):
        raise InvalidTagError(f"checkpoint tag {text!r} is not allowed: {allowed}")
    try:
        # os.fsencode is how pathlib and os name the directory: surrogateescape'd bytes count as the bytes
        # they stand for.
        size = len(os.fsencode(text))
    except UnicodeEncodeError:
        raise InvalidTagError(f"checkpoint tag {text!r} is not allowed: {allowed}; this one cannot be encoded "
                              f"in {sys.getfilesystemencoding()}") from None
    if size > MAX_TAG_BYTES:
        raise InvalidTagError(f"checkpoint tag {text!r} is not allowed: {allowed}; this one is {size} bytes")
    return text
