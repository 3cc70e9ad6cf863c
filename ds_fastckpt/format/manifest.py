"""The commit record of a checkpoint: every file with its size and CRC-32C, written last and atomically.

A tag directory that holds ``ds_fastckpt_manifest.json`` naming that
directory's own name as its tag is complete; one without it is not ours or
not finished (``records`` decides which). ``sequence`` orders checkpoints by
commit, whatever their tags are called.

Manifests and pending markers are read as untrusted input: at most
``MAX_MANIFEST_BYTES`` of a regular file (``small_files``), validated as a
whole against a strict schema before anything else looks at them. Anything
that does not fit raises ``ManifestError`` naming the file and the first
problem, never another exception, and never quoting more than an excerpt.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, List, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ds_fastckpt.format.atomicity import atomic_write_bytes
from ds_fastckpt.format.names import MANIFEST_NAME, PENDING_MARKER_NAME
from ds_fastckpt.format.small_files import SMALL_FILE_LIMIT, excerpt, read_small_file

FORMAT = 1
# About 190 bytes per file record: 64 MiB lists some 350,000 files, over ten per rank for 32,768 ranks, and
# bounds what a hostile manifest costs to read and parse.
MAX_MANIFEST_BYTES = 64 << 20
_MAX_INT64 = 2**63 - 1
_NAME_MAX = 255


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint, relative to its tag directory."""

    path: str
    bytes: int
    crc32c: int
    rank: int = 0
    host: str = ""


@dataclass(frozen=True)
class Manifest:
    tag: str
    step: Optional[int]
    sequence: int
    committed_unix_ns: int
    world_size: int
    deepspeed_version: str
    ds_fastckpt_version: str
    files: List[FileRecord] = field(default_factory=list)
    # Remote manifests only: files a client wrote beside the tag directory in its save_dir (the Hugging Face
    # Trainer's trainer_state.json, rng states, ...), paths relative to that save_dir (see remote.layout).
    client_files: List[FileRecord] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(record.bytes for record in self.files)

    def to_json(self) -> bytes:
        content = asdict(self)
        if not self.client_files:  # a local manifest stays as it always was
            del content["client_files"]
        return json.dumps({"format": FORMAT, **content}, indent=1).encode()


@dataclass(frozen=True)
class PendingMarker:
    """What marks a pending directory as ours: its tag, and the newest commit when its save started."""

    tag: str
    after_sequence: int


def read_manifest(tag_dir: Path) -> Optional[Manifest]:
    """The manifest of ``tag_dir``; None when it has none.

    Raises:
        ManifestError: when the manifest exists but is not a valid one: not a regular file (a FIFO, a
            symlink, ...), larger than ``MAX_MANIFEST_BYTES``, unreadable, or not matching the schema.
    """
    path = Path(tag_dir) / MANIFEST_NAME
    parsed = _read_validated(path, _ManifestSchema, MAX_MANIFEST_BYTES, "checkpoint manifest")
    return None if parsed is None else _manifest_of(parsed)


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """The manifest in ``raw`` (read from elsewhere, e.g. the remote tier), validated as ``read_manifest`` does.

    Raises:
        ManifestError: naming ``where`` and the first problem.
    """
    return _manifest_of(_validate(raw, _ManifestSchema, where, "checkpoint manifest"))


def _manifest_of(parsed) -> Manifest:
    return Manifest(**parsed.model_dump(exclude={"format", "files", "client_files"}),
                    files=[FileRecord(**record.model_dump()) for record in parsed.files],
                    client_files=[FileRecord(**record.model_dump()) for record in parsed.client_files])


def write_manifest(tag_dir: Path, manifest: Manifest, fsync: bool = True) -> None:
    """Writes ``manifest`` atomically; one that ``read_manifest`` would refuse is never written.

    Raises:
        ManifestError: ``manifest`` does not fit the schema (naming the first problem).
        OSError: from the write, with errno and path.
    """
    data = manifest.to_json()
    _validate(data, _ManifestSchema, tag_dir / MANIFEST_NAME, "checkpoint manifest to write")
    atomic_write_bytes(tag_dir / MANIFEST_NAME, data, fsync=fsync)


def write_pending_marker(pending_dir: Path, tag: str, after_sequence: int, fsync: bool = True) -> None:
    """Marks a pending directory as ours, and as started after commit number ``after_sequence``."""
    payload = json.dumps({"format": FORMAT, "tag": tag, "after_sequence": after_sequence}).encode()
    atomic_write_bytes(pending_dir / PENDING_MARKER_NAME, payload, fsync=fsync)


def pending_marker_of(pending_dir: Path) -> Optional[PendingMarker]:
    """The marker of a pending directory; None when it has none.

    Raises:
        ManifestError: when the marker exists but is not a valid one (as for ``read_manifest``, at most
            ``small_files.SMALL_FILE_LIMIT`` bytes).
    """
    path = Path(pending_dir) / PENDING_MARKER_NAME
    parsed = _read_validated(path, _PendingMarkerSchema, SMALL_FILE_LIMIT, "pending marker")
    return None if parsed is None else PendingMarker(tag=parsed.tag, after_sequence=parsed.after_sequence)


def read_pending_marker(pending_dir: Path) -> Optional[int]:
    """``after_sequence`` of a pending directory, or None when its marker is missing or unreadable."""
    try:
        marker = pending_marker_of(pending_dir)
    except ManifestError:
        return None
    return None if marker is None else marker.after_sequence


def check_relative_path(path: str) -> str:
    """``path`` if it is a plain relative path that stays inside the directory it is joined to.

    Plain means: '/'-separated components, none empty, '.' or '..'; not
    absolute; no backslash (another system's separator), NUL or other
    control character (which would also forge lines in messages); valid
    UTF-8; components of at most 255 bytes. Nothing on disk is looked at.

    Raises:
        ValueError: saying which rule ``path`` breaks, quoting an excerpt of it.
    """
    quoted = excerpt(path)
    try:
        encoded = path.encode()
    except UnicodeEncodeError:
        raise ValueError(f"path {quoted} is not valid UTF-8") from None
    if not path:
        raise ValueError("an empty path")
    if path.startswith("/"):
        raise ValueError(f"path {quoted} is absolute; paths must be relative to the tag directory")
    if "\\" in path:
        raise ValueError(f"path {quoted} holds a backslash")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in path):
        raise ValueError(f"path {quoted} holds a control character")
    for component in encoded.split(b"/"):
        if component in (b"", b".", b".."):
            raise ValueError(f"path {quoted} has an empty, '.' or '..' component; it must stay inside the tag "
                             "directory")
        if len(component) > _NAME_MAX:
            raise ValueError(f"path {quoted} has a component longer than {_NAME_MAX} bytes")
    return path


_Count = Annotated[int, Field(ge=0, le=_MAX_INT64)]
_Text = Annotated[str, Field(max_length=_NAME_MAX)]
_Tag = Annotated[str, Field(min_length=1, max_length=_NAME_MAX)]


class _Schema(BaseModel):
    # strict: 1 is an int, True and "1" and 1.0 are not. Unknown keys are ignored, so a later version may add
    # informational keys without making this one call its checkpoints damaged; a change that matters for
    # reading a checkpoint must bump FORMAT, which this version refuses.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    format: int

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != FORMAT:
            raise ValueError(f"format {value} is not one this version reads ({FORMAT})")
        return value


class _FileRecordSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    path: str
    bytes: _Count
    crc32c: Annotated[int, Field(ge=0, le=2**32 - 1)]
    rank: _Count = 0
    host: _Text = ""

    @field_validator("path")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        return check_relative_path(value)


class _ManifestSchema(_Schema):
    tag: _Tag
    step: Optional[_Count]
    sequence: _Count
    committed_unix_ns: _Count
    world_size: Annotated[int, Field(ge=1, le=_MAX_INT64)]
    deepspeed_version: _Text
    ds_fastckpt_version: _Text
    files: List[_FileRecordSchema]
    client_files: List[_FileRecordSchema] = []


class _PendingMarkerSchema(_Schema):
    tag: _Tag
    after_sequence: _Count


def _read_validated(path: Path, schema, limit: int, what: str):
    """``path`` parsed and validated by ``schema``; None when it does not exist. Raises ManifestError."""
    try:
        raw = read_small_file(path, limit)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ManifestError(f"{what} {path} is damaged and cannot be read ({error.strerror or error})") from None
    return _validate(raw, schema, path, what)


def _validate(raw: bytes, schema, path, what: str):
    try:
        return schema.model_validate_json(raw)
    except ValidationError as error:
        reason = _first_problem(error)
    except (ValueError, RecursionError) as error:  # the JSON parser's own limits
        reason = f"{type(error).__name__}: {excerpt(str(error))}"
    raise ManifestError(f"{what} {path} is damaged and cannot be read ({reason})") from None


def _first_problem(error: ValidationError) -> str:
    """The first problem pydantic found, where it is and what is wrong; never the offending value itself."""
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    text = f"{where}: {message}" if where else message
    return text if len(problems) == 1 else f"{text}; and {len(problems) - 1} more problem(s)"
