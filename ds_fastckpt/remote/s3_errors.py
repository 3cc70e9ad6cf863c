"""What a failed S3 request means for the remote tier: botocore's exceptions as ``RemoteError``s.

A store that cannot be reached, times out, refuses the credentials or lacks
its bucket is ``RemoteUnavailableError`` (retried with backoff); any other
refusal is ``RemoteError``. Messages name the store (url and endpoint), the
operation and the cause. botocore's messages hold the request's url, the
error code and the server's message, never a credential: neither do ours.
"""

import contextlib
from typing import Iterator, Optional

import urllib3.exceptions
from botocore.exceptions import (ClientError, ConnectionError, CredentialRetrievalError, HTTPClientError,
                                 IncompleteReadError, NoCredentialsError, PartialCredentialsError)

from ds_fastckpt.remote.store import RemoteError, RemoteUnavailableError

# Refusals that say the store, the credentials or the bucket are not (yet) right, or that the service is busy;
# retrying later may succeed. A 5xx status is one too, whatever its code.
_UNAVAILABLE_CODES = frozenset({
    "403", "AccessDenied", "AccountProblem", "AllAccessDisabled", "ExpiredToken", "InvalidAccessKeyId",
    "InvalidToken", "NoSuchBucket", "RequestTimeTooSkewed", "SignatureDoesNotMatch", "TokenRefreshRequired",
    "RequestTimeout", "SlowDown", "ServiceUnavailable", "InternalError",
    # The server received other bytes than the ones whose checksum we sent: damaged on the way, so sending the
    # same bytes again is the remedy (a local file that changed is caught by our own CRC, not by this).
    "BadDigest", "IncompleteBody",
})
# Failures below HTTP: nothing answered, the connection broke, or a timeout ran out. ReadTimeoutError and its
# kin derive from OSError too (botocore's vendored requests exceptions): they are mapped before a caller that
# treats OSError as a local error ever sees them.
_TRANSPORT_ERRORS = (ConnectionError, HTTPClientError, IncompleteReadError, urllib3.exceptions.HTTPError)
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def error_code(error: ClientError) -> str:
    """The S3 error code (``NoSuchKey``), or the HTTP status as text where the response had no body (HEAD)."""
    code = error.response.get("Error", {}).get("Code")
    return str(code) if code else str(status_of(error))


def status_of(error: ClientError) -> Optional[int]:
    """The HTTP status of the refused request, where there was one."""
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def is_not_found(error: BaseException) -> bool:
    """Whether ``error`` says there is no object at the key (a missing bucket says so in ``NoSuchBucket``)."""
    return isinstance(error, ClientError) and error_code(error) in _NOT_FOUND_CODES


def is_precondition_failed(error: BaseException) -> bool:
    """Whether ``error`` is the 412 of an ``IfMatch`` whose ETag the object no longer has."""
    return isinstance(error, ClientError) and (error_code(error) == "PreconditionFailed" or status_of(error) == 412)


def _describe_client_error(error: ClientError) -> str:
    details = error.response.get("Error", {})
    message = details.get("Message") or "no message"
    return f"{error_code(error)} (HTTP {status_of(error)}): {message}"


def as_remote_error(error: BaseException, where: str) -> Optional[RemoteError]:
    """The ``RemoteError`` that ``error`` of a request means, or None when it is not a request's failure.

    Args:
        where: the store's ``describe()``, the operation and the key, for the message.
    """
    if isinstance(error, ClientError):
        status = status_of(error) or 0
        if error_code(error) in _UNAVAILABLE_CODES or status == 403 or status >= 500:
            return RemoteUnavailableError(f"{where}: {_describe_client_error(error)}")
        return RemoteError(f"{where}: {_describe_client_error(error)}")
    if isinstance(error, _CREDENTIAL_ERRORS):
        return RemoteUnavailableError(f"{where}: {type(error).__name__}: {error} (credentials come from "
                                      "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role)")
    if isinstance(error, _TRANSPORT_ERRORS):
        return RemoteUnavailableError(f"{where}: {type(error).__name__}: {error}")
    return None


@contextlib.contextmanager
def mapped_errors(where: str) -> Iterator[None]:
    """Raises the ``RemoteError`` a failed request means instead of botocore's exception, chained to it."""
    try:
        yield
    except RemoteError:
        raise
    except Exception as error:
        remote = as_remote_error(error, where)
        if remote is None:
            raise
        raise remote from error
