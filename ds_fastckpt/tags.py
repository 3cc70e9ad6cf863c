"""Checkpoint tags become directory names inside save_dir; only safe ones are accepted."""

from .atomicity import TRASH_SUFFIX, tag_of_internal_name
from .resume import LATEST_NAME

# NAME_MAX is 255; the longest name we derive from a tag is ".<tag>.ds_fastckpt-trash".
MAX_TAG_LENGTH = 255 - 1 - len(TRASH_SUFFIX)


class InvalidTagError(ValueError):
    """A checkpoint tag that cannot name a directory inside save_dir safely."""


def validate_tag(tag) -> str:
    """Returns ``tag`` as a string if it is a safe single directory name.

    Raises:
        InvalidTagError: naming the tag and what is allowed.
    """
    text = str(tag)
    allowed = (f"a tag is one directory name of 1 to {MAX_TAG_LENGTH} characters, without '/' or NUL, "
               f"not '.', '..' or {LATEST_NAME!r}, not starting with '.'")
    if (not text or text in (".", "..", LATEST_NAME) or "/" in text or "\0" in text or text.startswith(".")
            or len(text) > MAX_TAG_LENGTH or tag_of_internal_name(text) is not None):
        raise InvalidTagError(f"checkpoint tag {text!r} is not allowed: {allowed}")
    return text
