"""The filesystem seam: every operation the commit, rotation, scan and save_dir lock do on storage.

``Storage`` (``base.py``) names the dozen operations those steps need, each
with its contract (atomicity, durability, what it refuses); ``PosixStorage``
(``posix.py``) is today's implementation. This package is the bottom layer:
it imports nothing else from ds_fastckpt.

Choosing a backend: ``storage_for(path)`` is the one place. Today every path
gets the process's ``PosixStorage``. An object-store or GPU-direct backend
is a new module here implementing ``Storage``, chosen in ``storage_for`` by
the path's scheme (``s3://...``) or by configuration; no caller changes.
Callers look the accessor up at call time, as ``storage.storage_for(path)``
after ``from ds_fastckpt import storage``, so that substituting it (a test
wrapping the backend, a future chooser) reaches every one of them.
"""

from pathlib import Path
from typing import Union

from ds_fastckpt.storage.base import (EntryKind, FileLock, LockHeldError, RefusedEntryError, Storage,
                                      UnsafeSmallFileError)
from ds_fastckpt.storage.posix import PosixStorage

_POSIX = PosixStorage()  # stateless: one per process


def storage_for(path: Union[str, Path]) -> Storage:
    """The backend that holds ``path``: today always the POSIX one.

    Args:
        path: the file or directory an operation is about (a save_dir, or an entry in one).
    """
    return _POSIX  # every path is POSIX today; its scheme or the config would pick another backend here


__all__ = ["EntryKind", "FileLock", "LockHeldError", "PosixStorage", "RefusedEntryError", "Storage",
           "UnsafeSmallFileError", "storage_for"]
