"""Which store a url names: ``s3://bucket/prefix`` (``S3Store``) or an absolute path (``FsStore``).

``check_url`` is what config validation asks; ``open_store`` opens the store.
boto3 is imported only when an ``s3://`` url is opened, so that a shared
filesystem needs no more than the package itself.
"""

import ipaddress
import re
from typing import Optional

from ds_fastckpt.format.manifest import check_relative_path
from ds_fastckpt.remote.fs_store import FsStore
from ds_fastckpt.remote.store import ObjectStore, RemoteError

S3_SCHEME = "s3://"
# S3's rules for a bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, a letter or digit at each end.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ALLOWED = "an s3://bucket/prefix url or an absolute directory path"


def _bucket_problem(bucket: str) -> Optional[str]:
    if not _BUCKET_NAME.match(bucket):
        return (f"bucket name {bucket!r} is not allowed: S3 bucket names are 3 to 63 lowercase letters, digits, dots "
                "and hyphens, starting and ending with a letter or digit")
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return f"bucket name {bucket!r} is not allowed: dots must not be next to another dot or a hyphen"
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return None
    return f"bucket name {bucket!r} is not allowed: it looks like an IP address"


def check_url(url: str) -> Optional[str]:
    """Why ``url`` cannot name a remote tier, or None when it can.

    Allowed: ``s3://bucket`` or ``s3://bucket/prefix`` (a valid bucket name;
    a prefix of plain '/'-separated components, no '.', '..' or empty one),
    or an absolute path other than '/' with no '..' component.
    """
    if not isinstance(url, str) or not url:
        return f"the url {url!r} is empty; expected {_ALLOWED}"
    if url.startswith(S3_SCHEME):
        bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
        if not bucket:
            return f"the url {url!r} names no bucket; expected s3://bucket/prefix"
        problem = _bucket_problem(bucket)
        if problem is not None:
            return f"the url {url!r}: {problem}"
        prefix = prefix[:-1] if prefix.endswith("/") else prefix
        if prefix:
            try:
                check_relative_path(prefix)
            except ValueError as error:
                return f"the url {url!r} has a prefix that is not allowed: {error}"
        return None
    if url.startswith("/"):
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in url):
            return f"the path {url!r} holds a control character"
        if ".." in url.split("/"):
            return f"the path {url!r} has a '..' component; give the directory's path without it"
        if url.strip("/") == "":
            return f"the path {url!r} is the filesystem's root; give a directory for the checkpoints"
        return None
    return f"the url {url!r} is not {_ALLOWED}"


def open_store(url: str, *, endpoint_url: Optional[str] = None, part_size: int, concurrency: int,
               request_timeout_s: float) -> ObjectStore:
    """The store ``url`` names. Nothing is sent yet: ``check_reachable()`` does the first request.

    Args:
        url: allowed by ``check_url``.
        endpoint_url: for ``s3://`` only: the service's ``http(s)://host:port``; None for the standard AWS
            configuration's (``AWS_ENDPOINT_URL``, profiles, or AWS itself).
        part_size, concurrency: bytes per part and parts at once (``ReplicateConfig`` holds the defaults).
        request_timeout_s: for ``s3://`` only: connect and read timeout of one request.

    Raises:
        ValueError: ``url`` is not allowed (the message says why).
        RemoteError: an ``s3://`` url without boto3 installed.
    """
    problem = check_url(url)
    if problem is not None:
        raise ValueError(problem)
    if not url.startswith(S3_SCHEME):
        return FsStore(url, part_size=part_size, concurrency=concurrency)
    try:
        from ds_fastckpt.remote.s3_store import S3Store
    except ModuleNotFoundError as error:
        if error.name not in ("boto3", "botocore", "urllib3"):
            raise
        raise RemoteError(f"{url} needs boto3, which is not installed ({error}): "
                          "pip install 'ds_fastckpt[s3]'") from None
    return S3Store(url, endpoint_url=endpoint_url, part_size=part_size, concurrency=concurrency,
                   request_timeout_s=request_timeout_s)
