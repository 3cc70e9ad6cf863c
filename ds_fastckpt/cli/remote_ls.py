"""``ds-fastckpt ls`` of the remote tier, and the ``replicated`` column of ``ls SAVE_DIR``.

Both are built from one ``read_catalog``: the complete checkpoints, the
damaged ones and the interrupted (or still running) uploads, with the
fields of the local ``ls --json`` rows.
"""

import json
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ds_fastckpt.cli.output import say
from ds_fastckpt.cli.remote_target import RemoteTier
from ds_fastckpt.cli.table import print_table
from ds_fastckpt.decisions.retention import RetentionPolicy
from ds_fastckpt.format.manifest import Manifest
from ds_fastckpt.remote.catalog import RemoteCatalog, read_catalog
from ds_fastckpt.remote.rotation import choose_remote
from ds_fastckpt.remote.store import ObjectStore, RemoteError

DAMAGED, UNFINISHED = "damaged", "unfinished upload"
# ``ls`` and ``prune`` leave an upload alone while its newest object is younger than this: it may be running.
DEFAULT_LEFTOVER_AGE_S = 3600.0

Replicated = Union[bool, str, None]  # True, False, "differs", or None when the remote tier cannot be read


def remote_rows(store: ObjectStore, catalog: RemoteCatalog, policy: RetentionPolicy,
                leftover_age_s: float = DEFAULT_LEFTOVER_AGE_S) -> List[dict]:
    """The rows of ``ls s3://...``: complete checkpoints by commit order, then damaged tags and unfinished uploads.

    ``next_to_delete`` marks what ``prune`` with ``policy`` would delete: the complete checkpoints the policy
    does not keep, and the unfinished uploads untouched for ``leftover_age_s``.
    """
    choice = choose_remote(catalog, policy)
    resume = catalog.resume_choice()
    now = time.time()
    rows = [{
        "tag": manifest.tag,
        "step": manifest.step,
        "complete": True,
        "state": "complete",
        "bytes": manifest.total_bytes,
        "files": len(manifest.files),
        "age_s": round(now - manifest.committed_unix_ns / 1e9, 1),
        "latest": manifest.tag == catalog.latest,
        "resume": resume is not None and manifest.tag == resume[0],
        "next_to_delete": manifest.tag in choice.doomed,
    } for manifest in catalog.ordered()]
    for tag, state in sorted([(tag, DAMAGED) for tag in catalog.damaged] + [(tag, UNFINISHED)
                                                                             for tag in catalog.uploads]):
        objects = store.list_keys(f"{tag}/")
        changed = [entry.modified for entry in objects if entry.modified is not None]
        age = round(now - max(changed), 1) if changed and len(changed) == len(objects) else None
        rows.append({"tag": tag, "step": None, "complete": False, "state": state,
                     "bytes": sum(entry.size for entry in objects), "files": len(objects), "age_s": age,
                     "latest": False, "resume": False,
                     "next_to_delete": tag in choice.leftovers and age is not None and age >= leftover_age_s})
    return rows


def resume_reason(catalog: RemoteCatalog, url: str) -> str:
    """Why a resume from the remote tier alone would take what ``RemoteCatalog.resume_choice`` gives."""
    choice = catalog.resume_choice()
    if choice is None:
        return f"{url} holds no complete ds_fastckpt checkpoint"
    if choice[0] == catalog.latest:
        return f"'latest' names {catalog.latest!r}, a complete checkpoint"
    if catalog.latest is None:
        why = "'latest' is missing, empty or unreadable"
    elif catalog.latest in catalog.damaged:
        why = f"'latest' names {catalog.latest!r}, which is damaged"
    else:
        why = f"'latest' names {catalog.latest!r}, which is not a complete checkpoint"
    return f"{why}; resuming from {choice[0]!r}, the newest complete checkpoint in {url}"


def _contents(manifest: Manifest) -> Dict[str, Tuple[int, int]]:
    return {record.path: (record.bytes, record.crc32c) for record in manifest.files}


def replication_of(local: Manifest, catalog: RemoteCatalog) -> Replicated:
    """True when the remote tier holds ``local``'s tag complete with the same files (paths, sizes, CRC-32C),
    "differs" when it holds a complete checkpoint of that name with other content, else False."""
    remote = catalog.complete.get(local.tag)
    if remote is None:
        return False
    return True if _contents(remote) == _contents(local) else "differs"


def replicated_marks(tier: RemoteTier, manifests: Sequence[Optional[Manifest]]
                     ) -> Tuple[List[Replicated], List[str], Optional[str]]:
    """For each local row (its manifest, None when not complete), whether the remote tier ``tier`` holds it.

    Returns:
        The marks (None for each complete row when the tier cannot be read), the remote tier's complete
        checkpoints that are not complete locally (commit order), and why the tier could not be read, or None.
    """
    try:
        store = tier.open()
        try:
            catalog = read_catalog(store)
        finally:
            store.close()
    except RemoteError as error:  # the column is a hint: the listing of save_dir goes on without it
        return [None if manifest is not None else False for manifest in manifests], [], str(error)
    local = {manifest.tag for manifest in manifests if manifest is not None}
    marks = [False if manifest is None else replication_of(manifest, catalog) for manifest in manifests]
    return marks, [manifest.tag for manifest in catalog.ordered() if manifest.tag not in local], None


def run(args, tier: RemoteTier, policy: RetentionPolicy) -> int:
    """``ls s3://...``: the table (or ``--json`` rows) of the remote tier ``tier``, listed with ``policy``."""
    store = tier.open()
    try:
        catalog = read_catalog(store)
        rows = remote_rows(store, catalog, policy)
    finally:
        store.close()
    if args.json:
        say(json.dumps(rows, indent=1))
        return 0
    print_table(rows, f"(no ds_fastckpt checkpoints in {tier.url})",
                [f"resume: {resume_reason(catalog, tier.url)}"] if rows else [])
    return 0
