"""The remote tier's rotation: its own ``keep_last``/``keep_every``, and the leftovers of interrupted uploads.

Choosing is separate from deleting, as for the local tier: ``choose_remote``
is pure over a catalog (``read_catalog``) and is what ``ds-fastckpt ls`` and
``prune --dry-run`` show; ``delete_remote`` deletes what was chosen;
``rotate_remote`` (the engine, after each remote commit) does both.

Deletes only what is ours: a complete checkpoint (manifest naming its tag)
the policy does not keep loses its manifest first, so it stops being complete
before any file goes, then the files the manifest lists and our reports; an
interrupted upload (reports, no manifest) loses the paths its reports name,
its reports, and its unfinished multipart uploads. Anything else under the
prefix, and any key a manifest or report does not name, is left alone.
"""

import logging
from typing import Iterable, List, NamedTuple, Optional, Set

from ds_fastckpt.decisions.retention import AnyOf, ProtectedTags, RetentionPolicy, unkept
from ds_fastckpt.format.records import CheckpointRecord
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.catalog import RemoteCatalog, read_catalog
from ds_fastckpt.remote.store import ObjectStore

logger = logging.getLogger(__name__)


class RemoteChoice(NamedTuple):
    """What a remote rotation deletes: unkept complete checkpoints (oldest commit first), then leftovers."""

    doomed: List[str]
    leftovers: List[str]


def choose_remote(catalog: RemoteCatalog, policy: RetentionPolicy, keep: Iterable[str] = ()) -> RemoteChoice:
    """What a rotation of the tier ``catalog`` describes deletes. Pure: nothing is read or deleted.

    Args:
        catalog: one look at the remote tier.
        policy: the remote retention policy (``replicate.keep_last``/``keep_every``); the newest complete
            checkpoint and the one ``latest`` names are always kept.
        keep: tags never to delete: the one just committed and those still uploading.
    """
    protected = set(keep) | ({catalog.latest} if catalog.latest else set())
    records = [CheckpointRecord(name=manifest.tag, tag=manifest.tag, manifest=manifest)
               for manifest in catalog.ordered()]
    doomed = [record.tag for record in unkept(records, AnyOf(policy, ProtectedTags(protected)))]
    return RemoteChoice(doomed, [tag for tag in catalog.uploads if tag not in protected])


def delete_remote(store: ObjectStore, catalog: RemoteCatalog, doomed: Iterable[str],
                  leftovers: Iterable[str]) -> None:
    """Deletes the complete checkpoints ``doomed`` (each manifest first) and the interrupted uploads ``leftovers``.

    Args:
        store: the remote tier ``catalog`` was read from.
        catalog: where the manifests of ``doomed`` come from: only the files they list are deleted.
        doomed: complete tags of ``catalog``, from ``choose_remote``.
        leftovers: tags of ``catalog.uploads``, from ``choose_remote``.
    """
    for tag in doomed:
        manifest = catalog.complete[tag]
        store.delete([layout.manifest_key(tag)])  # first: from here on the tag is not complete
        delete_upload(store, tag, [record.path for record in manifest.files] +
                      [layout.client_path(record.path) for record in manifest.client_files])
    for tag in leftovers:
        delete_upload(store, tag)


def rotate_remote(store: ObjectStore, policy: RetentionPolicy, keep: Set[str]) -> List[str]:
    """Deletes the remote checkpoints ``policy`` does not keep and the leftovers of uploads not in ``keep``.

    Args:
        store: the remote tier.
        policy: the remote retention policy (``replicate.keep_last``/``keep_every``).
        keep: tags never to delete: the one just committed and those still uploading. ``latest``'s is kept too.

    Returns:
        The tags deleted, complete ones and leftovers.
    """
    catalog = read_catalog(store)
    choice = choose_remote(catalog, policy, keep)
    delete_remote(store, catalog, choice.doomed, choice.leftovers)
    deleted = choice.doomed + choice.leftovers
    if deleted:
        logger.info("remote rotation deleted %s from %s", ", ".join(deleted), store.describe())
    return deleted


def newest_change(store: ObjectStore, tag: str) -> Optional[float]:
    """When the newest object under ``tag/`` was written (seconds since the epoch); None when unknown or empty.

    An upload still running keeps writing objects under its tag: an old newest
    change is how a command outside the job tells an interrupted upload from a
    live one.
    """
    times = [entry.modified for entry in store.list_keys(f"{tag}/")]
    if not times or any(modified is None for modified in times):
        return None
    return max(times)


def delete_upload(store: ObjectStore, tag: str, paths: Iterable[str] = ()) -> None:
    """Deletes ``paths`` of ``tag``, the paths its reports name, the reports, and its unfinished uploads."""
    reports = [entry.key for entry in store.list_keys(layout.report_prefix(tag))
               if layout.rank_of_report(entry.key, tag) is not None]
    named = set(paths)
    for key in reports:
        report = layout.parse_report(store.get_bytes(key, layout.REPORT_LIMIT) or b"")
        if report is not None:
            named.update(report.paths)
    store.abort_uploads(f"{tag}/")
    store.delete([layout.file_key(tag, path) for path in sorted(named)] + reports)
