"""``ObjectStore``: the few object operations the remote tier needs, and the errors they raise.

A store is a flat namespace of keys under one prefix (``s3://bucket/prefix``
or a directory on a shared filesystem); every key a caller passes is relative
to that prefix, ``/``-separated (``global_step10/mp_rank_00_model_states.pt``,
``latest``). An object appears whole or not at all: a reader never sees half
an upload under its key.

Call order, as the replicator uses it: every rank ``put_bytes`` its upload
report, ``upload_file`` of each file it wrote, ``put_bytes`` of its report
again; the leader ``list_keys``/``get_bytes`` the reports, ``put_bytes`` the
manifest last, then ``latest``. Rotation ``list_tags``, ``get_bytes`` each
manifest, ``delete`` what it retires, ``abort_uploads`` under a tag it cleans.

Errors: ``RemoteIntegrityError`` when bytes differ from what was expected
(never retried as is: the file or object changed); ``RemoteUnavailableError``
when the store cannot be reached, refuses the credentials or lacks its bucket
(retried with backoff during training). Neither message ever holds a secret.
Local I/O errors stay ``OSError`` with errno and path.
"""

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional


class RemoteError(Exception):
    """A remote-tier operation that failed; the message names the store (url and endpoint, never a secret)."""


class RemoteUnavailableError(RemoteError):
    """The store cannot be reached, refuses the credentials, lacks its bucket, or timed out."""


class RemoteIntegrityError(RemoteError):
    """Bytes differ from what the manifest says (size or CRC-32C), on the way up or down."""


class RemoteObjectTooLargeError(RemoteError):
    """An object read with a limit (a manifest, a report, ``latest``) is larger than that limit."""


@dataclass(frozen=True)
class RemoteObject:
    """One object: its key relative to the store's prefix, its size in bytes, and when it was written.

    ``modified`` is seconds since the epoch, or None where the store does not say; it takes no part in
    comparisons, so that two listings of the same objects compare equal.
    """

    key: str
    size: int
    modified: Optional[float] = field(default=None, compare=False)


class ObjectStore(abc.ABC):
    """A prefix in an object store or on a shared filesystem. Safe to use from several threads at once.

    Attributes:
        url: the url it was opened with, for messages.
    """

    url: str

    @abc.abstractmethod
    def describe(self) -> str:
        """The url, and the endpoint where there is one, for messages; never a credential."""

    @abc.abstractmethod
    def check_reachable(self) -> None:
        """Makes one cheap request that needs the store, its bucket and the credentials to be right.

        Raises:
            RemoteUnavailableError: naming ``describe()`` and what went wrong.
        """

    @abc.abstractmethod
    def upload_file(self, local_path: Path, key: str, *, size: int, crc32c: int) -> None:
        """Uploads the local file to ``key``, checking that what is sent is what the manifest records.

        The CRC-32C of the bytes read and sent is computed on the way, in parts
        sent in parallel; the store checks each part's checksum on arrival where
        it can. When the bytes read differ from ``size``/``crc32c``, or the
        stored object's size differs, the object is deleted (or the multipart
        upload aborted) and ``RemoteIntegrityError`` is raised.

        Raises:
            RemoteIntegrityError, RemoteUnavailableError; OSError (errno and path) reading the local file.
        """

    @abc.abstractmethod
    def download_file(self, key: str, local_path: Path, *, size: int, crc32c: int) -> None:
        """Downloads ``key`` into a new file ``local_path`` (created exclusively, never through a symlink), fsynced.

        An object whose size is not ``size`` is refused before any byte is
        written; the CRC-32C of the bytes received is checked against
        ``crc32c``. On any error ``local_path`` is removed.

        Raises:
            FileNotFoundError: no object at ``key``.
            RemoteIntegrityError, RemoteUnavailableError; OSError (errno and path) writing the local file.
        """

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Stores ``data`` at ``key`` in one request, replacing what was there."""

    @abc.abstractmethod
    def get_bytes(self, key: str, limit: int) -> Optional[bytes]:
        """The object at ``key`` (at most ``limit`` bytes), or None when there is none.

        Raises:
            RemoteObjectTooLargeError: it is larger than ``limit``; nothing more than ``limit + 1`` bytes is read.
        """

    @abc.abstractmethod
    def list_keys(self, prefix: str) -> List[RemoteObject]:
        """Every object whose key starts with ``prefix`` (``"global_step10/"``), any order, all pages."""

    @abc.abstractmethod
    def list_tags(self) -> List[str]:
        """The names directly under the store's prefix that hold objects (``<tag>`` of ``<tag>/...``), any order."""

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Deletes these objects; a key with nothing there is no error."""

    def close(self) -> None:
        """Stops the store's transfer threads once the transfers running end; the store is not used afterwards."""

    @abc.abstractmethod
    def abort_uploads(self, prefix: str) -> int:
        """Aborts the unfinished (multipart) uploads whose key starts with ``prefix``; returns how many.

        Their parts take space without being visible objects. A store without
        such uploads removes the temporary files of interrupted uploads instead.
        """
