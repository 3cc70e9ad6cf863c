"""Manifests and pending markers: the on-disk format, and everything else refused as damaged before use."""

import dataclasses
import json
from pathlib import Path

import pytest

from ds_fastckpt.format.manifest import (MAX_MANIFEST_BYTES, FileRecord, Manifest, ManifestError, PendingMarker,
                                         pending_marker_of, read_manifest, read_pending_marker, write_manifest,
                                         write_pending_marker)
from ds_fastckpt.format.names import MANIFEST_NAME, PENDING_MARKER_NAME
from tests.hostile_helpers import SECRET, link_to_dev_zero, link_to_secret, make_fifo, nested_json, promptly

# Exactly what ds_fastckpt 0.x wrote for format 1 (json.dumps(indent=1) of the dataclasses): must still read.
FORMAT_1 = b"""{
 "format": 1,
 "tag": "global_step2",
 "step": 2,
 "sequence": 2,
 "committed_unix_ns": 1764200000000000000,
 "world_size": 2,
 "deepspeed_version": "0.19.8",
 "ds_fastckpt_version": "0.1.0",
 "files": [
  {
   "path": "mp_rank_00_model_states.pt",
   "bytes": 12345,
   "crc32c": 4294967295,
   "rank": 0,
   "host": "node-a"
  },
  {
   "path": "sub/zero_pp_rank_1_mp_rank_00_optim_states.pt",
   "bytes": 0,
   "crc32c": 0,
   "rank": 1,
   "host": "node-b"
  }
 ]
}"""

EXPECTED = Manifest(tag="global_step2", step=2, sequence=2, committed_unix_ns=1764200000000000000, world_size=2,
                    deepspeed_version="0.19.8", ds_fastckpt_version="0.1.0",
                    files=[FileRecord(path="mp_rank_00_model_states.pt", bytes=12345, crc32c=2**32 - 1, rank=0,
                                      host="node-a"),
                           FileRecord(path="sub/zero_pp_rank_1_mp_rank_00_optim_states.pt", bytes=0, crc32c=0,
                                      rank=1, host="node-b")])


def manifest_dir(tmp_path, content) -> Path:
    tag_dir = tmp_path / "global_step2"
    tag_dir.mkdir(exist_ok=True)
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    (tag_dir / MANIFEST_NAME).write_bytes(raw)
    return tag_dir


def valid() -> dict:
    return json.loads(FORMAT_1)


def test_format_1_reads_and_writes_byte_for_byte(tmp_path):
    tag_dir = manifest_dir(tmp_path, FORMAT_1)
    assert read_manifest(tag_dir) == EXPECTED
    assert EXPECTED.to_json() == FORMAT_1
    write_manifest(tag_dir, EXPECTED, fsync=False)
    assert (tag_dir / MANIFEST_NAME).read_bytes() == FORMAT_1
    assert EXPECTED.total_bytes == 12345


def test_dataclass_api_is_kept(tmp_path):
    share = dataclasses.replace(EXPECTED, files=EXPECTED.files[1::2])  # as verified_load does
    assert share.files == [EXPECTED.files[1]] and share.tag == "global_step2"
    assert FileRecord(path="a.pt", bytes=1, crc32c=2) == FileRecord("a.pt", 1, 2, 0, "")


def test_missing_manifest_is_none(tmp_path):
    assert read_manifest(tmp_path) is None


def test_unknown_keys_are_ignored(tmp_path):
    data = valid()
    data["written_by"] = {"anything": [1, 2, {"deep": True}]}
    data["files"][0]["future_field"] = "x"
    assert read_manifest(manifest_dir(tmp_path, data)) == EXPECTED


def test_null_step_is_allowed(tmp_path):
    data = valid()
    data["step"] = None
    assert read_manifest(manifest_dir(tmp_path, data)).step is None


def _set(path, value):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return data
    return change


_DELETE = object()

# (change, what the message says)
INVALID = {
    "string step": (_set(["step"], "2"), "step: Input should be a valid integer"),
    "bool step": (_set(["step"], True), "step: Input should be a valid integer"),
    "float step": (_set(["step"], 2.0), "step: Input should be a valid integer"),
    "negative step": (_set(["step"], -1), "step: Input should be greater than or equal to 0"),
    "string sequence": (_set(["sequence"], "2"), "sequence: Input should be a valid integer"),
    "missing sequence": (_set(["sequence"], _DELETE), "sequence: Field required"),
    "string time": (_set(["committed_unix_ns"], "yesterday"), "committed_unix_ns: Input should be a valid integer"),
    "huge time": (_set(["committed_unix_ns"], 2**64), "committed_unix_ns: Input should be less than or equal to"),
    "zero world": (_set(["world_size"], 0), "world_size: Input should be greater than or equal to 1"),
    "format 2": (_set(["format"], 2), "format: format 2 is not one this version reads (1)"),
    "format true": (_set(["format"], True), "format: Input should be a valid integer"),
    "format missing": (_set(["format"], _DELETE), "format: Field required"),
    "empty tag": (_set(["tag"], ""), "tag: String should have at least 1 character"),
    "number tag": (_set(["tag"], 2), "tag: Input should be a valid string"),
    "files not a list": (_set(["files"], {"a": 1}), "files: Input should be a valid array"),
    "string bytes": (_set(["files", 0, "bytes"], "12345"), "files.0.bytes: Input should be a valid integer"),
    "negative bytes": (_set(["files", 0, "bytes"], -1), "files.0.bytes: Input should be greater than or equal to 0"),
    "bool bytes": (_set(["files", 0, "bytes"], False), "files.0.bytes: Input should be a valid integer"),
    "crc too big": (_set(["files", 1, "crc32c"], 2**32), "files.1.crc32c: Input should be less than or equal to"),
    "negative crc": (_set(["files", 1, "crc32c"], -1), "files.1.crc32c: Input should be greater than or equal to 0"),
    "number path": (_set(["files", 0, "path"], 7), "files.0.path: Input should be a valid string"),
    "absolute path": (_set(["files", 0, "path"], "/etc/passwd"), "files.0.path: path '/etc/passwd' is absolute"),
    "dotdot path": (_set(["files", 0, "path"], "../outside.pt"), "has an empty, '.' or '..' component"),
    "inner dotdot": (_set(["files", 0, "path"], "sub/../../x.pt"), "has an empty, '.' or '..' component"),
    "dot path": (_set(["files", 0, "path"], "./x.pt"), "has an empty, '.' or '..' component"),
    "empty component": (_set(["files", 0, "path"], "sub//x.pt"), "has an empty, '.' or '..' component"),
    "trailing slash": (_set(["files", 0, "path"], "sub/"), "has an empty, '.' or '..' component"),
    "empty path": (_set(["files", 0, "path"], ""), "files.0.path: an empty path"),
    "nul": (_set(["files", 0, "path"], "a\0b"), "holds a control character"),
    "newline": (_set(["files", 0, "path"], "a\nforged log line"), "holds a control character"),
    "backslash": (_set(["files", 0, "path"], "..\\x.pt"), "holds a backslash"),
    "long component": (_set(["files", 0, "path"], "a" * 256), "has a component longer than 255 bytes"),
    "rank string": (_set(["files", 0, "rank"], "0"), "files.0.rank: Input should be a valid integer"),
    "host number": (_set(["files", 0, "host"], 1), "files.0.host: Input should be a valid string"),
    "not an object": (lambda data: [data], "Input should be an object"),
}


@pytest.mark.parametrize("change, message", INVALID.values(), ids=INVALID.keys())
def test_invalid_manifests_are_damaged_naming_the_file_and_problem(tmp_path, change, message):
    tag_dir = manifest_dir(tmp_path, change(valid()))
    with pytest.raises(ManifestError) as raised:
        read_manifest(tag_dir)
    text = str(raised.value)
    assert text.startswith(f"checkpoint manifest {tag_dir / MANIFEST_NAME} is damaged and cannot be read (")
    assert message in text
    assert len(text) < 400 and "\n" not in text


def test_every_problem_is_counted_not_quoted(tmp_path):
    data = valid()
    data["files"] = [{"path": "/x" * 1000, "bytes": "y" * 10000, "crc32c": -1}] * 50
    with pytest.raises(ManifestError, match=r"and \d+ more problem") as raised:
        read_manifest(manifest_dir(tmp_path, data))
    assert len(str(raised.value)) < 400 and "yyyy" not in str(raised.value)


@pytest.mark.parametrize("content", [b"\x00garbage{", b"", b"[1, 2]", b"\xff\xfe{}", nested_json(),
                                     b'{"format": 1, "files": ' + nested_json(50_000) + b"}"],
                         ids=["garbage", "empty", "list", "not utf-8", "nested", "nested files"])
def test_unparseable_manifests_are_damaged(tmp_path, content):
    tag_dir = manifest_dir(tmp_path, content)
    with pytest.raises(ManifestError, match="is damaged and cannot be read") as raised:
        read_manifest(tag_dir)
    assert len(str(raised.value)) < 400


def test_deeply_nested_json_is_damaged_not_a_recursion_error(tmp_path):
    with pytest.raises(RecursionError):
        json.loads(nested_json())  # what the old reader did with it
    tag_dir = manifest_dir(tmp_path, nested_json())
    with pytest.raises(ManifestError, match="recursion limit"):
        read_manifest(tag_dir)


@pytest.mark.parametrize("plant, kind", [(make_fifo, "a FIFO"), (link_to_dev_zero, "a symbolic link"),
                                         (link_to_secret, "a symbolic link")])
@pytest.mark.parametrize("name, read", [(MANIFEST_NAME, read_manifest), (PENDING_MARKER_NAME, pending_marker_of)])
def test_special_metadata_files_are_damaged_at_once(tmp_path, plant, kind, name, read):
    tag_dir = tmp_path / "save" / "global_step2"
    tag_dir.mkdir(parents=True)
    plant(tag_dir / name)
    outcome = promptly(read, tag_dir, timeout=20)
    assert outcome.error_type == "ManifestError", outcome
    assert str(tag_dir / name) in outcome.error and f"it is {kind}, not a regular file" in outcome.error
    assert SECRET not in outcome.text and outcome.output_chars < 400
    assert promptly(read_pending_marker, tag_dir, timeout=20).value is None


def test_a_manifest_over_the_limit_is_not_read(tmp_path):
    tag_dir = manifest_dir(tmp_path, FORMAT_1)
    with open(tag_dir / MANIFEST_NAME, "r+b") as file:
        file.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ManifestError, match=f"larger than {MAX_MANIFEST_BYTES} bytes"):
        read_manifest(tag_dir)


def test_a_manifest_that_would_be_refused_is_never_written(tmp_path):
    bad = dataclasses.replace(EXPECTED, files=[FileRecord(path="../escape.pt", bytes=1, crc32c=1)])
    with pytest.raises(ManifestError, match="files.0.path"):
        write_manifest(tmp_path, bad, fsync=False)
    assert list(tmp_path.iterdir()) == []


def test_pending_marker_round_trip(tmp_path):
    write_pending_marker(tmp_path, "global_step3", 7, fsync=False)
    assert (tmp_path / PENDING_MARKER_NAME).read_bytes() == b'{"format": 1, "tag": "global_step3", "after_sequence": 7}'
    assert pending_marker_of(tmp_path) == PendingMarker(tag="global_step3", after_sequence=7)
    assert read_pending_marker(tmp_path) == 7


@pytest.mark.parametrize("content", [b'{"format": 1, "tag": "t", "after_sequence": "7"}',
                                     b'{"format": 1, "tag": "t", "after_sequence": true}',
                                     b'{"format": 1, "tag": "t", "after_sequence": -1}',
                                     b'{"format": 2, "tag": "t", "after_sequence": 7}',
                                     b'{"format": 1, "after_sequence": 7}', nested_json(), b"x" * 5000])
def test_invalid_pending_markers(tmp_path, content):
    (tmp_path / PENDING_MARKER_NAME).write_bytes(content)
    with pytest.raises(ManifestError, match=f"pending marker {tmp_path / PENDING_MARKER_NAME} is damaged"):
        pending_marker_of(tmp_path)
    assert read_pending_marker(tmp_path) is None
    assert pending_marker_of(tmp_path / "nope") is None
