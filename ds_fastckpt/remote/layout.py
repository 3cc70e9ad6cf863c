"""Every key ds_fastckpt writes in the remote tier, and what the reports in it say.

``<tag>/<path>``                              a checkpoint file, at the path the local manifest gives it
``<tag>/ds_fastckpt_manifest.json``           the commit record, uploaded only after every file it names
``<tag>/.ds_fastckpt-upload.rank<N>.json``    rank N's upload report: ``uploading`` (with the paths it sends),
                                              then ``done``, ``skipped`` or ``failed``; removed once committed
``<tag>/ds_fastckpt_client/<name>``           a file a client wrote beside the tag directory in its save_dir
                                              (the Hugging Face Trainer's ``trainer_state.json``, ...), listed
                                              in the manifest's ``client_files``
``latest``                                    the newest committed tag, as text

A tag is complete remotely when its manifest exists. A tag without one is
ours only when it holds one of our reports: those name every path an
interrupted upload may have left, and only those paths are ever deleted.
"""

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ds_fastckpt.format.manifest import FileRecord, check_relative_path
from ds_fastckpt.format.names import LATEST_NAME, MANIFEST_NAME
from ds_fastckpt.format.tags import tag_problem

CLIENT_DIR = "ds_fastckpt_client"
REPORT_PREFIX = ".ds_fastckpt-upload.rank"
REPORT_SUFFIX = ".json"
REPORT_LIMIT = 1 << 20  # a report lists a rank's paths: a few per rank
UPLOADING, DONE, SKIPPED, FAILED = "uploading", "done", "skipped", "failed"
FINAL_STATES = (DONE, SKIPPED, FAILED)


def file_key(tag: str, path: str) -> str:
    return f"{tag}/{path}"


def client_path(name: str) -> str:
    """Where, relative to its tag, a client file is kept remotely."""
    return f"{CLIENT_DIR}/{name}"


def manifest_key(tag: str) -> str:
    return f"{tag}/{MANIFEST_NAME}"


def latest_key() -> str:
    return LATEST_NAME


def report_key(tag: str, rank: int) -> str:
    return f"{tag}/{REPORT_PREFIX}{rank}{REPORT_SUFFIX}"


def report_prefix(tag: str) -> str:
    return f"{tag}/{REPORT_PREFIX}"


def rank_of_report(key: str, tag: str) -> Optional[int]:
    """The rank whose report ``key`` is, or None when ``key`` is not a report of ``tag``."""
    prefix = report_prefix(tag)
    if not (key.startswith(prefix) and key.endswith(REPORT_SUFFIX)):
        return None
    digits = key[len(prefix):-len(REPORT_SUFFIX)]
    return int(digits) if digits.isdigit() else None


@dataclass(frozen=True)
class UploadReport:
    """What one rank says of its upload of one checkpoint."""

    state: str
    paths: Tuple[str, ...] = ()
    reason: str = ""
    client_files: Tuple[FileRecord, ...] = ()  # in a ``done`` report: the client files sent, with their CRC-32C

    def to_json(self) -> bytes:
        return json.dumps({"state": self.state, "paths": list(self.paths), "reason": self.reason,
                           "client_files": [dataclasses.asdict(record) for record in self.client_files]}).encode()


def parse_report(raw: bytes) -> Optional[UploadReport]:
    """The report in ``raw``, or None when it is not one (a report is untrusted: anyone may write the store)."""
    try:
        data = json.loads(raw)
        state, paths, reason = data["state"], data.get("paths", []), data.get("reason", "")
        if state not in (UPLOADING, *FINAL_STATES) or not isinstance(reason, str):
            return None
        client_files = tuple(_client_record(record) for record in data.get("client_files", []))
        return UploadReport(state, tuple(check_relative_path(path) for path in paths), reason, client_files)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _client_record(record: dict) -> FileRecord:
    name, size, crc = record["path"], record["bytes"], record["crc32c"]
    if "/" in check_relative_path(name) or not isinstance(size, int) or not isinstance(crc, int) or size < 0 \
            or not 0 <= crc < 2**32 or isinstance(size, bool) or isinstance(crc, bool):
        raise ValueError("not a client file record")
    return FileRecord(path=name, bytes=size, crc32c=crc)


def is_tag_name(name: str) -> bool:
    """Whether a name under the prefix may be a tag of ours (the tag rule every saved tag passed)."""
    return tag_problem(name) is None and name != LATEST_NAME


def remote_records(files: Sequence[FileRecord], node_local: bool) -> List[FileRecord]:
    """The files of the remote checkpoint, one record per path, each naming the rank that uploads it.

    With node-local storage every node has its copy of the files all ranks
    there share (the model states): the lowest rank holding a path uploads
    it. Elsewhere each path has one record already.
    """
    by_path: Dict[str, FileRecord] = {}
    for record in sorted(files, key=lambda record: record.rank):
        by_path.setdefault(record.path, record)
    if not node_local and len(by_path) != len(files):
        raise ValueError("two ranks recorded the same file of one checkpoint")
    return sorted(by_path.values(), key=lambda record: record.path)
