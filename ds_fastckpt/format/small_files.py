"""Reading the small metadata files of a save_dir (manifests, pending markers, ``latest``) as untrusted input.

Anyone who can write to save_dir can put a FIFO, a device, a symlink to
``/dev/zero`` or to another file, or a huge file where such a file is
expected. A plain ``open().read()`` then blocks forever (a FIFO with no
writer), reads until memory runs out (``/dev/zero``), or pours another file
into the log. ``read_small_file`` reads only a regular file that is the
named entry itself (never a symlink's target), never blocks on open, and
never reads more than a stated number of bytes. ``excerpt`` is how a
message quotes what such a file holds: short and escaped.

The reading itself is the storage backend's (``Storage.read_small``), and so
is ``UnsafeSmallFileError``, re-exported here for the callers that catch it.
"""

from pathlib import Path
from typing import Union

from ds_fastckpt import storage
from ds_fastckpt.storage import UnsafeSmallFileError

__all__ = ["EXCERPT_CHARS", "SMALL_FILE_LIMIT", "UnsafeSmallFileError", "excerpt", "read_small_file"]

# A page: `latest` holds one tag (a directory name, at most 255 bytes), a pending marker a tag and a number.
SMALL_FILE_LIMIT = 4096
EXCERPT_CHARS = 80


def read_small_file(path: Union[str, Path], limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The content of ``path``, a regular file of at most ``limit`` bytes.

    A FIFO or device is never opened at all, a symlink never followed, and
    the read stops after ``limit + 1`` bytes even if the file grows while it
    is read (on POSIX: ``lstat``, then an ``O_NOFOLLOW | O_NONBLOCK`` open and
    ``fstat`` that catch an entry swapped in between).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        UnsafeSmallFileError: when it is a symlink, FIFO, device, socket or directory (errno EINVAL; ELOOP for
            a symlink), or larger than ``limit`` bytes (EFBIG).
        OSError: when it cannot be read (EACCES, EIO, ...), with errno and path.
    """
    return storage.storage_for(path).read_small(path, limit)


def excerpt(content: Union[bytes, str], chars: int = EXCERPT_CHARS) -> str:
    """How a message quotes file content: ``repr`` of its first ``chars`` characters (bytes for ``bytes``).

    ``repr`` escapes newlines, terminal escapes and other unprintable
    characters, so quoted content can neither forge log lines nor flood
    them; longer content is cut and says how long it was.
    """
    if len(content) <= chars:
        return repr(content)
    unit = "bytes" if isinstance(content, bytes) else "characters"
    return f"{content[:chars]!r}... ({len(content)} {unit})"

