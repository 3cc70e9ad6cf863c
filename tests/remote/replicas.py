"""What the remote-tier tests share: the ``replicate`` section for a url, and reading what the store holds."""

from typing import List

from ds_fastckpt.remote.options import MIN_PART_SIZE
from ds_fastckpt.remote.store import ObjectStore
from ds_fastckpt.remote.url import open_store


def replicate_options(url: str, seaweed, keep_last_remote: int = 0, **extra) -> dict:
    """The ``replicate`` section for ``url``: the test server's endpoint for ``s3://``, short timeouts."""
    options = {"url": url, "keep_last": keep_last_remote, "request_timeout_s": 5, "wait_timeout_s": 60, **extra}
    if url.startswith("s3://"):
        options["endpoint_url"] = seaweed.endpoint_url
    return options


def store_of(url: str, seaweed) -> ObjectStore:
    return open_store(url, endpoint_url=seaweed.endpoint_url if url.startswith("s3://") else None,
                      part_size=MIN_PART_SIZE, concurrency=4, request_timeout_s=5)


def remote_bytes(store: ObjectStore, key: str) -> bytes:
    data = store.get_bytes(key, 1 << 30)
    assert data is not None, f"no object at {key}"
    return data


def remote_keys(store: ObjectStore, prefix: str) -> List[str]:
    return sorted(entry.key for entry in store.list_keys(prefix))
