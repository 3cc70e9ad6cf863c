"""The ``replicate`` section on its own: accepted values, refused ones, and the message a user reads."""

import math

import pytest

from ds_fastckpt import ConfigError
from ds_fastckpt.engine.config import parse_fast_aio
from ds_fastckpt.remote.options import ReplicateConfig

URL = "s3://my-bucket/run42"
SECONDS = "a finite number of seconds > 0"

# key -> (accepted, refused, what the message says is allowed)
TABLE = {
    "keep_last": ([0, 1, 10], [-1, "3", 2.0, True, None], "an integer >= 0 (0 keeps every checkpoint)"),
    "keep_every": ([0, 100], [-1, 1.5, "10"], "an integer >= 0 (0 turns it off)"),
    "max_pending": ([1, 4], [0, -1, 1.0, "1", None], "a positive integer"),
    "part_size": ([5 << 20, 64 << 20], [0, 1024, (5 << 20) - 1, (5 << 30) + 1, 8.0, "16MiB"],
                  "an integer >= 5242880, at most 5368709120"),
    "concurrency": ([1, 8, 64], [0, 65, 2.5, "8"], "a positive integer, at most 64"),
    "request_timeout_s": ([1, 0.5, 60], [0, -1, math.nan, math.inf, "60", True], SECONDS),
    "wait_timeout_s": ([1, 300], [0, math.inf, "5"], SECONDS),
}


def parse(**replicate):
    return parse_fast_aio({"fast_aio": {"replicate": replicate}})


def test_defaults_and_a_section_left_out():
    assert parse_fast_aio({}).replicate is None
    assert parse_fast_aio({"fast_aio": {"replicate": None}}).replicate is None
    options = parse(url=URL).replicate
    assert isinstance(options, ReplicateConfig)
    assert (options.url, options.endpoint_url, options.keep_last, options.keep_every, options.max_pending) == (
        URL, None, 0, 0, 1)
    assert (options.part_size, options.concurrency, options.request_timeout_s, options.wait_timeout_s) == (
        16 << 20, 8, 60, 300)


@pytest.mark.parametrize("key, value", [(key, value) for key, (accepted, _, _) in TABLE.items()
                                        for value in accepted], ids=repr)
def test_accepted_value_is_kept(key, value):
    kept = getattr(parse(url=URL, **{key: value}).replicate, key)
    assert kept == value and type(kept) is type(value)


@pytest.mark.parametrize("key, value, allowed", [(key, value, allowed) for key, (_, refused, allowed) in TABLE.items()
                                                 for value in refused], ids=repr)
def test_refused_value_names_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as raised:
        parse(url=URL, **{key: value})
    assert str(raised.value) == f"checkpoint.fast_aio.replicate.{key}={value!r} is not allowed: it must be {allowed}"


@pytest.mark.parametrize("url", ["s3://bucket", "s3://my.bucket-1/a/b/c", "s3://bucket/prefix/", "/mnt/lustre/ckpt"])
def test_urls_allowed(url):
    assert parse(url=url).replicate.url == url


@pytest.mark.parametrize("url, reason", [
    ("relative/dir", "is not"), ("", "is empty"), ("s3://", "names no bucket"), ("s3://B/x", "bucket name 'B'"),
    ("s3://ab/x", "bucket name 'ab'"), ("s3://bucket/a/../b", "'..'"), ("/", "root"), ("/mnt/../etc", "'..'"),
    ("http://host/bucket", "is not"), ("gs://bucket/x", "is not"),
])
def test_urls_refused_with_the_reason(url, reason):
    with pytest.raises(ConfigError) as raised:
        parse(url=url)
    assert str(raised.value).startswith(f"checkpoint.fast_aio.replicate.url={url!r} is not allowed: ")
    assert reason in str(raised.value)


@pytest.mark.parametrize("value, message", [
    (7, "replicate.url=7 is not allowed"),
    (None, "replicate.url=None is not allowed"),
])
def test_url_of_the_wrong_type(value, message):
    with pytest.raises(ConfigError, match=message):
        parse(url=value)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "https://s3.example.com"])
def test_endpoints_allowed(endpoint):
    assert parse(url=URL, endpoint_url=endpoint).replicate.endpoint_url == endpoint


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "ftp://x", "http://", ""])
def test_endpoints_refused(endpoint):
    with pytest.raises(ConfigError) as raised:
        parse(url=URL, endpoint_url=endpoint)
    assert str(raised.value) == (f"checkpoint.fast_aio.replicate.endpoint_url={endpoint!r} is not allowed: the "
                                 f"endpoint {endpoint!r} is not an http:// or https:// url")


def test_url_is_required_and_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"^checkpoint\.fast_aio\.replicate needs \"url\""):
        parse(keep_last=2)
    with pytest.raises(ConfigError) as raised:
        parse(url=URL, bucket="x", secret_key="y")
    assert str(raised.value) == (
        "checkpoint.fast_aio.replicate has unknown key(s) 'bucket', 'secret_key': allowed keys are url, "
        "endpoint_url, keep_last, keep_every, max_pending, part_size, concurrency, request_timeout_s, wait_timeout_s")


@pytest.mark.parametrize("section", [[URL], URL, 3, True])
def test_a_section_that_is_not_an_object_is_refused(section):
    with pytest.raises(ConfigError, match=r"^checkpoint\.fast_aio\.replicate=.* is not allowed: it must be an object"):
        parse_fast_aio({"fast_aio": {"replicate": section}})
