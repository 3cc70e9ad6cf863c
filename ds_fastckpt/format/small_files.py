"""Reading the small metadata files of a save_dir (manifests, pending markers, ``latest``) as untrusted input.

Anyone who can write to save_dir can put a FIFO, a device, a symlink to
``/dev/zero`` or to another file, or a huge file where such a file is
expected. A plain ``open().read()`` then blocks forever (a FIFO with no
writer), reads until memory runs out (``/dev/zero``), or pours another file
into the log. ``read_small_file`` reads only a regular file that is the
named entry itself (never a symlink's target), never blocks on open, and
never reads more than a stated number of bytes. ``excerpt`` is how a
message quotes what such a file holds: short and escaped.
"""

import errno
import os
import stat
from pathlib import Path
from typing import Union

# A page: `latest` holds one tag (a directory name, at most 255 bytes), a pending marker a tag and a number.
SMALL_FILE_LIMIT = 4096
EXCERPT_CHARS = 80

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class UnsafeSmallFileError(OSError):
    """A metadata file that is not a regular file, or larger than its limit; errno and filename are set."""


def read_small_file(path: Union[str, Path], limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The content of ``path``, a regular file of at most ``limit`` bytes.

    ``path`` is looked at with ``lstat`` first, so a FIFO or device is never
    opened at all; the open (``O_NOFOLLOW | O_NONBLOCK``) and ``fstat`` then
    catch an entry swapped in between. The read stops after ``limit + 1``
    bytes even if the file grows while it is read.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        UnsafeSmallFileError: when it is a symlink, FIFO, device, socket or directory (errno EINVAL; ELOOP for
            a symlink), or larger than ``limit`` bytes (EFBIG).
        OSError: when it cannot be read (EACCES, EIO, ...), with errno and path.
    """
    _require_regular(os.lstat(path).st_mode, path)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        _require_regular(info.st_mode, path)
        if info.st_size > limit:
            raise _too_large(path, limit, f"{info.st_size} bytes")
        chunks, total = [], 0
        while chunk := os.read(fd, limit + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _too_large(path, limit, "it grew while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


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


def _require_regular(mode: int, path) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "of an unknown type")
    code = errno.ELOOP if stat.S_ISLNK(mode) else errno.EINVAL
    raise UnsafeSmallFileError(code, f"it is {kind}, not a regular file; not read", str(path))


def _too_large(path, limit: int, found: str) -> UnsafeSmallFileError:
    return UnsafeSmallFileError(errno.EFBIG, f"larger than {limit} bytes, the most read here ({found}); not read",
                                str(path))
