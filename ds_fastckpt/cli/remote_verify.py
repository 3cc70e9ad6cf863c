"""``ds-fastckpt verify s3://...``: every file of the remote tier's checkpoints downloaded and checked.

Each file the manifest lists is downloaded into a temporary directory
(``ObjectStore.download_file`` refuses a wrong size before any byte lands
and checks the CRC-32C of what arrives), then removed: the remote bytes are
checked as a resume would fetch them, with one file's worth of local space.
"""

import os
import tempfile
from pathlib import Path
from typing import List

from ds_fastckpt.cli.output import say
from ds_fastckpt.cli.remote_target import RemoteTier
from ds_fastckpt.cli.verify import Progress
from ds_fastckpt.format.manifest import FileRecord, Manifest
from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.catalog import read_catalog
from ds_fastckpt.remote.store import ObjectStore, RemoteIntegrityError, RemoteUnavailableError


def _check(store: ObjectStore, where: str, tag: str, record: FileRecord, scratch: Path) -> List[str]:
    target = scratch / "file"
    try:
        store.download_file(layout.file_key(tag, record.path), target, size=record.bytes, crc32c=record.crc32c)
    except FileNotFoundError:
        return [f"{where}: missing (the manifest lists {record.bytes} bytes)"]
    except RemoteIntegrityError as error:
        # The scratch file it names is gone when the line is read: only the sizes and CRC-32C say anything.
        return [f"{where}: does not match the manifest: {str(error).replace(f' ({target})', '')}"]
    except RemoteUnavailableError:
        raise  # the store, not this file: nothing more can be verified
    finally:
        if os.path.lexists(target):
            os.unlink(target)
    return []


def run(args, tier: RemoteTier) -> int:
    url = tier.url.rstrip("/")
    store = tier.open()
    try:
        catalog = read_catalog(store)
        problems: List[str] = []
        targets: List[Manifest] = []
        for tag in args.tags or [manifest.tag for manifest in catalog.ordered()] + sorted(catalog.damaged):
            if tag in catalog.complete:
                targets.append(catalog.complete[tag])
            elif tag in catalog.damaged:
                problems.append(catalog.damaged[tag])
            elif tag in catalog.uploads:
                problems.append(f"{url}/{tag}: an unfinished upload (no {MANIFEST_NAME})")
            else:
                problems.append(f"{url}/{tag}: not a ds_fastckpt checkpoint (no {MANIFEST_NAME})")
        files = [(manifest.tag, record) for manifest in targets for record in manifest.files]
        progress = Progress(sum(record.bytes for _, record in files), len(files))
        try:
            with tempfile.TemporaryDirectory(prefix="ds_fastckpt-verify-") as scratch:
                for tag, record in files:
                    where = f"{url}/{layout.file_key(tag, record.path)}"
                    problems.extend(_check(store, where, tag, record, Path(scratch)))
                    progress.advance(record.bytes)
                    progress.file_done(where)
        finally:
            progress.close()
    finally:
        store.close()
    for line in problems:
        say(line)
    if not targets and not problems:
        say(f"{url} holds no ds_fastckpt checkpoint (no tag with {MANIFEST_NAME}): nothing was verified")
        return 1
    if problems:
        say(f"{len(problems)} problem(s) found in {url}")
        return 1
    say(f"all {len(files)} files of {len(targets)} checkpoint(s) in {url} are intact")
    return 0
