"""Which remote tier a command works on: an ``s3://`` url given as its target, ``--remote``, or a save_dir's note.

A local path is a save_dir, as it always was; only ``s3://`` names the
remote tier as a command's target (a shared-filesystem url cannot be told
from a save_dir). ``ls SAVE_DIR`` looks at the tier named by ``--remote``,
else by the note the engine leaves in save_dir (``REMOTE_NOTE_NAME``).

Credentials and the endpoint come the standard AWS ways
(``AWS_ENDPOINT_URL``, profiles, ...); ``--endpoint-url`` overrides the
endpoint, also the one a note records.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ds_fastckpt.cli.output import warn
from ds_fastckpt.format.names import REMOTE_NOTE_NAME
from ds_fastckpt.format.small_files import excerpt, read_small_file
from ds_fastckpt.remote.options import ReplicateConfig
from ds_fastckpt.remote.store import ObjectStore
from ds_fastckpt.remote.url import S3_SCHEME, check_url, open_store


def is_remote(target: str) -> bool:
    """Whether a command's target names the remote tier rather than a save_dir."""
    return target.startswith(S3_SCHEME)


def add_endpoint_argument(parser) -> None:
    parser.add_argument("--endpoint-url", metavar="URL",
                        help="the S3 endpoint (http://host:port); default: the standard AWS configuration's")


@dataclass(frozen=True)
class RemoteTier:
    """Where a remote tier is: its url and, when one is named, its S3 endpoint."""

    url: str
    endpoint_url: Optional[str] = None

    def open(self) -> ObjectStore:
        """The store, opened with the engine's default transfer options; nothing is requested yet.

        Raises:
            ValueError: the url is not one the remote tier accepts, saying why.
        """
        problem = check_url(self.url)
        if problem is not None:
            raise ValueError(f"{self.url!r} is not a remote tier url: {problem}")
        options = ReplicateConfig(url=self.url, endpoint_url=self.endpoint_url)  # its defaults, one place
        return open_store(options.url, endpoint_url=options.endpoint_url, part_size=options.part_size,
                          concurrency=options.concurrency, request_timeout_s=options.request_timeout_s)


def tier_of_save_dir(save_dir: Path, remote: Optional[str], endpoint_url: Optional[str]) -> Optional[RemoteTier]:
    """The tier ``ls SAVE_DIR`` compares with: ``--remote``, else save_dir's note; None when neither names one.

    The note is untrusted (anyone who can write save_dir may have put it there): a note that cannot be read or
    does not hold a url the remote tier accepts is ignored with a warning.
    """
    if remote is not None:
        return RemoteTier(remote, endpoint_url)
    path = save_dir / REMOTE_NOTE_NAME
    try:
        raw = read_small_file(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        warn(f"ignoring {path}: {error.strerror or error}")
        return None
    try:
        note = json.loads(raw)
        url, noted_endpoint = note["url"], note.get("endpoint_url")
        if not isinstance(url, str) or not (noted_endpoint is None or isinstance(noted_endpoint, str)):
            raise TypeError("url and endpoint_url must be strings")
    except (ValueError, TypeError, KeyError, AttributeError):
        warn(f"ignoring {path}: it does not hold {{\"url\": ..., \"endpoint_url\": ...}}: {excerpt(raw)}")
        return None
    problem = check_url(url)
    if problem is not None:
        warn(f"ignoring {path}: its url {excerpt(url)} is not a remote tier url: {problem}")
        return None
    return RemoteTier(url, endpoint_url if endpoint_url is not None else noted_endpoint)
