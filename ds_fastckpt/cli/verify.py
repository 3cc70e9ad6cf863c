"""``ds-fastckpt verify``: every file's size and CRC-32C against its manifest, with progress.

A save_dir's files are read in place; the remote tier's (``s3://...``) are downloaded one at a time and
checked on the way (``remote_verify``).
"""

import os
import stat
import sys
from pathlib import Path
from typing import List, Tuple

from ds_fastckpt.cli.output import say, warn
from ds_fastckpt.format.manifest import FileRecord
from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.format.records import scan
from ds_fastckpt.native.op import load_op

_CHUNK = 8 << 20


class Progress:
    """A progress bar on a terminal, one plain line per file otherwise; both on stderr."""

    def __init__(self, total_bytes: int, total_files: int):
        self._files_done, self._total_files = 0, total_files
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, file=sys.stderr, desc="verify")

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def file_done(self, path: Path) -> None:
        self._files_done += 1
        if self._bar is None:
            warn(f"verified {self._files_done}/{self._total_files}: {path}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _crc32c_of(file, progress: Progress) -> Tuple[int, int]:
    op, crc, size = load_op(), 0, 0
    while chunk := file.read(_CHUNK):
        crc = op.crc32c(chunk, crc)
        size += len(chunk)
        progress.advance(len(chunk))
    return crc, size


def _check(path: Path, record: FileRecord, progress: Progress) -> List[str]:
    # The manifest's paths were checked to stay inside the tag directory when it was read; what is there may
    # still be a FIFO or a device: never opened, or (swapped in since the stat) opened without blocking.
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return [f"{path}: not a regular file (the manifest lists {record.bytes} bytes)"]
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return [f"{path}: missing (the manifest lists {record.bytes} bytes)"]
    except OSError as error:
        return [f"{path}: cannot be read: {error.strerror} (the manifest lists {record.bytes} bytes)"]
    with open(fd, "rb", buffering=0) as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return [f"{path}: not a regular file (the manifest lists {record.bytes} bytes)"]
        if info.st_size != record.bytes:
            return [f"{path}: {info.st_size} bytes, the manifest says {record.bytes} (truncated or overwritten)"]
        crc, _ = _crc32c_of(file, progress)
    if crc != record.crc32c:
        return [f"{path}: CRC-32C {crc:#010x}, the manifest says {record.crc32c:#010x} (content changed)"]
    return []


def run(args) -> int:
    save_dir = Path(args.dir)
    if not save_dir.is_dir():
        raise FileNotFoundError(2, "not a checkpoint directory", str(save_dir))
    records = [record for record in scan(save_dir, include_not_ours=True) if not record.leftover]
    by_tag = {record.tag: record for record in records}
    problems, targets = [], []
    for tag in args.tags or [record.tag for record in records if record.not_ours is None]:
        record = by_tag.get(tag)
        if record is None:
            problems.append(f"{save_dir / tag}: not a ds_fastckpt checkpoint (no manifest)")
        elif record.not_ours:
            problems.append(f"{save_dir / tag}: {record.not_ours}")
        elif record.damaged:
            problems.append(record.damaged)
        else:
            targets.append(record)
    files = [(save_dir / record.name / file.path, file) for record in targets for file in record.manifest.files]
    progress = Progress(sum(file.bytes for _, file in files), len(files))
    try:
        for path, file in files:
            problems.extend(_check(path, file, progress))
            progress.file_done(path)
    finally:
        progress.close()
    for line in problems:
        say(line)
    if not targets and not problems:
        say(f"{save_dir} holds no ds_fastckpt checkpoint (no tag directory with {MANIFEST_NAME}): nothing was "
            "verified")
        return 1
    if problems:
        say(f"{len(problems)} problem(s) found in {save_dir}")
        return 1
    say(f"all {len(files)} files of {len(targets)} checkpoint(s) in {save_dir} are intact")
    return 0
