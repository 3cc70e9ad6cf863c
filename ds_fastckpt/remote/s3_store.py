"""``S3Store``: an ``ObjectStore`` on any S3-API service (AWS, SeaweedFS, MinIO, ...) through boto3's low-level client.

Files up to ``part_size`` go in one ``put_object``; larger ones in our own
multipart upload, parts read with ``os.pread`` and sent in parallel. Every
request that carries bytes carries their CRC-32C (``ChecksumCRC32C``), which
the server checks on arrival (SeaweedFS 4.48 refuses a wrong one with
``BadDigest``, as AWS does); the parts' CRCs, combined in order, must equal
the manifest's before the upload is completed. Downloads are ranged gets in
parallel, each conditional on the ETag seen first, so an object replaced
meanwhile fails instead of mixing two versions.
"""

import base64
import errno
import logging
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import boto3
import botocore.config
from botocore.exceptions import BotoCoreError, ClientError

from ds_fastckpt.format.manifest import check_relative_path
from ds_fastckpt.remote.parts import (PartPool, check_transfer, combine_crcs, crc32c_of, downloading_to, naming,
                                      open_to_upload, part_ranges, read_part, run_parts, write_part)
from ds_fastckpt.remote.s3_errors import is_not_found, is_precondition_failed, mapped_errors
from ds_fastckpt.remote.store import (ObjectStore, RemoteError, RemoteIntegrityError, RemoteObject,
                                      RemoteObjectTooLargeError, RemoteUnavailableError)

logger = logging.getLogger(__name__)

MIN_PART_SIZE = 5 << 20  # S3 refuses a smaller part but the last (SeaweedFS too: EntityTooSmall at completion)
MAX_PARTS = 10000  # S3's most parts in one upload
_DELETE_BATCH = 1000  # S3's most keys in one delete_objects
_DEFAULT_REGION = "us-east-1"


def _checksum_header(crc: int) -> str:
    """A CRC-32C as S3's ``x-amz-checksum-crc32c`` wants it: base64 of its 4 big-endian bytes."""
    return base64.b64encode(struct.pack(">I", crc)).decode("ascii")


def _parse_url(url: str) -> Tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/some/prefix``; the prefix ends with '/' unless it is empty."""
    if not url.startswith("s3://"):
        raise ValueError(f"S3Store needs an s3://bucket/prefix url, not {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"the url {url!r} names no bucket")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Store(ObjectStore):
    """A prefix of an S3 bucket. Safe to use from several threads at once.

    Credentials, the region and (unless ``endpoint_url`` is given) the
    endpoint come the standard AWS ways: environment, profiles, instance
    roles, ``AWS_ENDPOINT_URL``. A custom endpoint is addressed path-style
    (``http://host:port/bucket/key``), which every S3-API server serves.
    botocore retries a failed request once; the caller retries longer, with
    backoff, on ``RemoteUnavailableError``.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        endpoint_url: ``http(s)://host:port`` of the service; None for the standard configuration's.
        part_size: bytes per part of a multipart upload or ranged download, at least 5 MiB.
        concurrency: parts sent or received at once, for all transfers of this store together.
        request_timeout_s: how long a request may wait to connect, and then for each read.
    """

    def __init__(self, url: str, *, endpoint_url: Optional[str], part_size: int, concurrency: int,
                 request_timeout_s: float):
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's smallest multipart part, {MIN_PART_SIZE} bytes")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.url = url
        self.bucket, self._prefix = _parse_url(url)
        self.part_size = part_size
        custom_endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = botocore.config.Config(
            connect_timeout=request_timeout_s, read_timeout=request_timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
            # The workers, plus the requests of callers' own threads (create, complete, head) beside them.
            max_pool_connections=concurrency + 4,
            # We send our own CRC-32C where it matters and check what we receive ourselves; left "when_supported",
            # botocore would compute a second checksum of every body, and validating a CRC-32C needs awscrt.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if custom_endpoint else None)
        try:
            session = boto3.session.Session()
            self._client = session.client("s3", endpoint_url=endpoint_url, region_name=session.region_name or
                                          _DEFAULT_REGION, config=config)
        except BotoCoreError as error:  # an AWS_PROFILE that no file has, an endpoint_url that is no url, ...
            raise RemoteError(f"{url}: cannot configure the S3 client: {error}") from error
        self._executor = PartPool(concurrency, "ds_fastckpt-s3")

    def describe(self) -> str:
        return f"{self.url} (endpoint {self._client.meta.endpoint_url})"

    def close(self) -> None:
        """Stops the transfer threads once the transfers running end; the store is not used afterwards."""
        self._executor.shutdown()

    def _where(self, operation: str, key: Optional[str] = None) -> str:
        return f"{self.describe()}: {operation}" + ("" if key is None else f" {key!r}")

    def _full_key(self, key: str) -> str:
        return self._prefix + check_relative_path(key)

    def check_reachable(self) -> None:
        with mapped_errors(self._where("checking the bucket")):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as error:
                if is_not_found(error):
                    raise RemoteUnavailableError(f"{self.describe()}: bucket {self.bucket!r} does not exist") from None
                raise

    def upload_file(self, local_path: Path, key: str, *, size: int, crc32c: int) -> None:
        full_key = self._full_key(key)
        with mapped_errors(self._where("uploading", key)):
            fd = open_to_upload(local_path, key, size)
            try:
                if size <= self.part_size:
                    self._put_whole(fd, local_path, key, full_key, size, crc32c)
                else:
                    self._put_in_parts(fd, local_path, key, full_key, size, crc32c)
            finally:
                os.close(fd)

    def _put_whole(self, fd: int, local_path: Path, key: str, full_key: str, size: int, expected_crc: int) -> None:
        data = read_part(fd, 0, size, local_path)
        got_crc = crc32c_of(data)
        # Checked before sending: bytes that are not the manifest's never reach the key.
        check_transfer("upload", key, local_path, expected_size=size, expected_crc=expected_crc, got_size=len(data),
                       got_crc=got_crc)
        self._client.put_object(Bucket=self.bucket, Key=full_key, Body=data, ChecksumCRC32C=_checksum_header(got_crc))

    def _upload_part_size(self, size: int) -> int:
        """``part_size``, or more (in whole MiB) where a file would otherwise need more than ``MAX_PARTS`` parts."""
        smallest = -(-size // MAX_PARTS)
        return max(self.part_size, -(-smallest // (1 << 20)) << 20)

    def _put_in_parts(self, fd: int, local_path: Path, key: str, full_key: str, size: int, expected_crc: int) -> None:
        part_size = self._upload_part_size(size)
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=full_key,
                                                         ChecksumAlgorithm="CRC32C")["UploadId"]
        try:
            def send(offset: int, length: int) -> Tuple[Dict[str, Any], int, int]:
                data = read_part(fd, offset, length, local_path)
                if len(data) != length:
                    raise RemoteIntegrityError(f"upload of {key!r} ({local_path}): expected {size} bytes, the file "
                                               f"ended at {offset + len(data)} while it was read")
                crc = crc32c_of(data)
                number = offset // part_size + 1
                response = self._client.upload_part(Bucket=self.bucket, Key=full_key, UploadId=upload_id,
                                                    PartNumber=number, Body=data, ChecksumCRC32C=_checksum_header(crc))
                part = {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32C": _checksum_header(crc)}
                return part, crc, length

            parts = run_parts(self._executor, send, part_ranges(size, part_size))
            check_transfer("upload", key, local_path, expected_size=size, expected_crc=expected_crc,
                           got_size=sum(length for _, _, length in parts),
                           got_crc=combine_crcs([(crc, length) for _, crc, length in parts]))
            self._client.complete_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id,
                                                   MultipartUpload={"Parts": [part for part, _, _ in parts]})
        except BaseException:
            self._abort_quietly(full_key, upload_id)
            raise
        stored = self._client.head_object(Bucket=self.bucket, Key=full_key)["ContentLength"]
        if stored != size:
            self._client.delete_object(Bucket=self.bucket, Key=full_key)
            raise RemoteIntegrityError(f"upload of {key!r} ({local_path}): sent {size} bytes, the store holds "
                                       f"{stored}; the object is deleted")

    def _abort_quietly(self, full_key: str, upload_id: str) -> None:
        """Aborts an upload that failed; an abort that fails too is logged: ``abort_uploads`` cleans up later."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
        except Exception as error:  # the first failure is the one to report
            logger.warning("could not abort the multipart upload of %r to %s: %s", full_key, self.describe(), error)

    def _head(self, key: str, full_key: str) -> Dict[str, Any]:
        """``head_object`` of the key; FileNotFoundError when it is missing, unavailable when the bucket is."""
        try:
            return self._client.head_object(Bucket=self.bucket, Key=full_key)
        except ClientError as error:
            if not is_not_found(error):
                raise
        # A HEAD answers 404 without a body for a missing bucket too: ask the bucket to tell the two apart.
        self.check_reachable()
        raise FileNotFoundError(errno.ENOENT, f"no object {key!r} in {self.describe()}", key)

    def download_file(self, key: str, local_path: Path, *, size: int, crc32c: int) -> None:
        full_key = self._full_key(key)
        with mapped_errors(self._where("downloading", key)):
            head = self._head(key, full_key)
            if head["ContentLength"] != size:
                raise RemoteIntegrityError(f"download of {key!r} ({local_path}): the manifest records {size} bytes, "
                                           f"the object has {head['ContentLength']}")
            same_object = {"IfMatch": head["ETag"]}
            if head.get("VersionId"):
                same_object["VersionId"] = head["VersionId"]
            with downloading_to(local_path) as fd:
                with naming(local_path, f"extending to {size} bytes"):
                    os.ftruncate(fd, size)
                self._get_in_parts(fd, local_path, key, full_key, size, crc32c, same_object)

    def _get_in_parts(self, fd: int, local_path: Path, key: str, full_key: str, size: int, expected_crc: int,
                      same_object: Dict[str, str]) -> None:
        def fetch(offset: int, length: int) -> Tuple[int, int]:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full_key,
                                                   Range=f"bytes={offset}-{offset + length - 1}", **same_object)
            except ClientError as error:
                if is_precondition_failed(error) or is_not_found(error):
                    raise RemoteIntegrityError(f"download of {key!r} ({local_path}): the object was replaced or "
                                               "deleted while it was downloaded") from error
                raise
            body = response["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            if len(data) != length:
                raise RemoteIntegrityError(f"download of {key!r} ({local_path}): asked for {length} bytes at "
                                           f"offset {offset}, received {len(data)}")
            write_part(fd, data, offset, local_path)
            return crc32c_of(data), length

        parts = run_parts(self._executor, fetch, part_ranges(size, self.part_size))
        check_transfer("download", key, local_path, expected_size=size, expected_crc=expected_crc,
                       got_size=sum(length for _, length in parts), got_crc=combine_crcs(parts))

    def put_bytes(self, key: str, data: bytes) -> None:
        full_key = self._full_key(key)
        with mapped_errors(self._where("writing", key)):
            self._client.put_object(Bucket=self.bucket, Key=full_key, Body=data,
                                    ChecksumCRC32C=_checksum_header(crc32c_of(data)))

    def get_bytes(self, key: str, limit: int) -> Optional[bytes]:
        full_key = self._full_key(key)
        with mapped_errors(self._where("reading", key)):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full_key)
            except ClientError as error:
                if is_not_found(error):
                    return None
                raise
            body = response["Body"]
            try:
                too_large = response.get("ContentLength", 0) > limit  # then refused without reading the body
                data = b"" if too_large else body.read(limit + 1)
            finally:
                body.close()
        if too_large or len(data) > limit:
            raise RemoteObjectTooLargeError(f"{self.describe()}: {key!r} is larger than {limit} bytes")
        return data

    def list_keys(self, prefix: str) -> List[RemoteObject]:
        found = []
        with mapped_errors(self._where("listing", prefix)):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=self._prefix + prefix)
            for page in pages:
                for entry in page.get("Contents", []):
                    found.append(RemoteObject(entry["Key"][len(self._prefix):], entry["Size"],
                                              entry["LastModified"].timestamp()))
        return found

    def list_tags(self) -> List[str]:
        with mapped_errors(self._where("listing the tags")):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._prefix,
                                                                           Delimiter="/")
            prefixes = [entry["Prefix"] for page in pages for entry in page.get("CommonPrefixes", [])]
            # SeaweedFS (4.48) keeps listing a prefix as a common prefix once every object under it is deleted (its
            # filer keeps the directory); AWS does not. One small listing per prefix keeps only those with objects.
            holding = list(self._executor.map(self._holds_objects, prefixes))
        return [prefix[len(self._prefix):].rstrip("/") for prefix, holds in zip(prefixes, holding) if holds]

    def _holds_objects(self, prefix: str) -> bool:
        return self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0

    def delete(self, keys: Iterable[str]) -> None:
        full_keys = [self._full_key(key) for key in keys]
        failures = []
        with mapped_errors(self._where("deleting")):
            for start in range(0, len(full_keys), _DELETE_BATCH):
                batch = full_keys[start:start + _DELETE_BATCH]
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True})
                failures.extend(response.get("Errors", []))
        if failures:
            shown = ", ".join(f"{failure.get('Key', '?')!r} ({failure.get('Code')}: {failure.get('Message')})"
                              for failure in failures[:10])
            raise RemoteError(f"{self.describe()}: could not delete {len(failures)} objects: {shown}")

    def abort_uploads(self, prefix: str) -> int:
        aborted = 0
        with mapped_errors(self._where("aborting the uploads under", prefix)):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                  Prefix=self._prefix + prefix)
            for page in pages:
                for upload in page.get("Uploads", []):
                    try:
                        self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                            UploadId=upload["UploadId"])
                    except ClientError as error:
                        if error.response.get("Error", {}).get("Code") != "NoSuchUpload":  # ended meanwhile
                            raise
                        continue
                    aborted += 1
        return aborted
