"""The ``checkpoint.fast_aio.replicate`` section: where the remote tier is and how it is kept.

```json
"replicate": {"url": "s3://my-bucket/run42", "endpoint_url": null,
              "keep_last": 10, "keep_every": 0, "max_pending": 1}
```

Credentials are never part of it: they come the standard AWS ways
(environment, profiles, instance roles), as does the endpoint
(``AWS_ENDPOINT_URL``) unless ``endpoint_url`` is given.
"""

from typing import Annotated, Any, Mapping, Optional, Union

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import Field, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

from ds_fastckpt.native.refusals import refusal
from ds_fastckpt.remote.url import check_url

REPLICATE_KEY = "replicate"
SECTION = f"checkpoint.fast_aio.{REPLICATE_KEY}"
MIN_PART_SIZE = 5 << 20  # S3's smallest multipart part (all but the last)
MAX_PART_SIZE = 5 << 30  # S3's largest part
_Seconds = Annotated[Union[StrictInt, StrictFloat],
                     Field(gt=0, allow_inf_nan=False, json_schema_extra={"unit": "seconds"})]


class ReplicateConfig(DeepSpeedConfigModel):
    """Options of the remote tier."""

    url: StrictStr = Field(json_schema_extra={"note": "s3://bucket/prefix, or an absolute path on a shared "
                                                      "filesystem"})
    """Where checkpoints are replicated: ``s3://bucket/prefix`` (any S3-API store) or an absolute directory path on a
    shared filesystem. Each checkpoint goes to ``<prefix>/<tag>/``, then ``<prefix>/latest`` names the newest."""

    endpoint_url: Optional[StrictStr] = None
    """The S3 endpoint (``http://host:port``); left out, the standard AWS configuration decides."""

    keep_last: StrictInt = Field(0, ge=0, json_schema_extra={"note": "0 keeps every checkpoint"})
    """Complete remote checkpoints to keep, newest by commit order; 0 keeps all. Independent of the local one."""

    keep_every: StrictInt = Field(0, ge=0, json_schema_extra={"note": "0 turns it off"})
    """Also keep every remote checkpoint whose step is a multiple of this; 0 turns it off."""

    max_pending: StrictInt = Field(1, ge=1)
    """Checkpoints that may wait for their upload on a rank (besides the one uploading); beyond it the oldest
    waiting one is skipped with a warning, so the remote tier always gets the newest. Each is kept on the local
    disk until it is replicated or skipped, beyond ``keep_last``."""

    part_size: StrictInt = Field(16 << 20, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    """Bytes per part of a multipart upload or ranged download; a file no larger goes in one request."""

    concurrency: StrictInt = Field(8, ge=1, le=64)
    """Parts each rank sends or receives at once."""

    request_timeout_s: _Seconds = 60
    """How long one request may wait to connect or for data before it is retried."""

    wait_timeout_s: _Seconds = 300
    """How long ``ds_fastckpt.wait_all()`` and the interpreter's exit wait for uploads still running."""

    @field_validator("url")
    @classmethod
    def _known_url(cls, value: str) -> str:
        problem = check_url(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _http_endpoint(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not (value.startswith(("http://", "https://")) and len(value.split("//", 1)[1])):
            raise ValueError(f"the endpoint {value!r} is not an http:// or https:// url")
        return value


class ReplicateConfigError(ValueError):
    """A ``replicate`` value that is not allowed; the message names the key, the value and what is."""


def parse_replicate(section: Any) -> Optional[ReplicateConfig]:
    """Validates the ``replicate`` section; None when it is left out or null.

    Raises:
        ReplicateConfigError: for an unknown key, a missing url, or a value that is not allowed.
    """
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ReplicateConfigError(f"{SECTION}={section!r} is not allowed: it must be an object with at least "
                                   "\"url\"")
    keys = tuple(ReplicateConfig.model_fields)
    unknown = sorted(set(section) - set(keys), key=str)
    if unknown:
        raise ReplicateConfigError(f"{SECTION} has unknown key(s) {', '.join(map(repr, unknown))}: allowed keys are "
                                   f"{', '.join(keys)}")
    if "url" not in section:
        raise ReplicateConfigError(f"{SECTION} needs \"url\": s3://bucket/prefix, or an absolute path on a shared "
                                   "filesystem")
    try:
        return ReplicateConfig(strict=True, **section)
    except ValidationError as error:
        refused = refusal(ReplicateConfig, error)
        if refused.key in ("url", "endpoint_url") and error.errors()[0]["type"] == "value_error":
            reason = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise ReplicateConfigError(f"{SECTION}.{refused.key}={section[refused.key]!r} is not allowed: "
                                       f"{reason}") from None
        raise ReplicateConfigError(f"{SECTION}.{refused.key}={section[refused.key]!r} is not allowed: "
                                   f"it must be {refused.allowed}") from None
