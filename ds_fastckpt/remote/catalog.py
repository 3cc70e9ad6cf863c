"""What the remote tier holds: its complete checkpoints, its ``latest``, and the leftovers of interrupted uploads.

Everything read here is untrusted (anyone with write access to the bucket
may have put it there): a manifest is validated as a local one is
(``manifest.parse_manifest``) and must name its own tag; a name that breaks
the tag rule, or a manifest that cannot be read, is not ours and is left
alone.
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ds_fastckpt.format.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, parse_manifest
from ds_fastckpt.format.small_files import excerpt
from ds_fastckpt.format.tags import tag_problem
from ds_fastckpt.remote import layout
from ds_fastckpt.remote.store import ObjectStore, RemoteError, RemoteUnavailableError

logger = logging.getLogger(__name__)

LATEST_LIMIT = 4096


@dataclass
class RemoteCatalog:
    """One look at the remote tier.

    Attributes:
        complete: tag -> manifest of every complete checkpoint of ours.
        latest: the tag ``latest`` names, when it is readable and passes the tag rule.
        damaged: tag -> why its manifest cannot be read; never deleted.
        uploads: tags without a manifest that hold our upload reports: interrupted or ongoing uploads.
    """

    complete: Dict[str, Manifest] = field(default_factory=dict)
    latest: Optional[str] = None
    damaged: Dict[str, str] = field(default_factory=dict)
    uploads: List[str] = field(default_factory=list)

    def ordered(self) -> List[Manifest]:
        """The complete checkpoints, oldest commit first."""
        return sorted(self.complete.values(), key=commit_order)

    def resume_choice(self) -> Optional[Tuple[str, Manifest]]:
        """What a resume from this tier takes: the complete checkpoint ``latest`` names, else the newest complete."""
        if self.latest in self.complete:
            return self.latest, self.complete[self.latest]
        ordered = self.ordered()
        return (ordered[-1].tag, ordered[-1]) if ordered else None


def commit_order(manifest: Manifest) -> Tuple[int, int]:
    """The key that orders checkpoints by commit, across tiers: commit time, then sequence."""
    return manifest.committed_unix_ns, manifest.sequence


def read_catalog(store: ObjectStore) -> RemoteCatalog:
    """Lists the remote tier and reads every manifest in it (one request per tag).

    Raises:
        RemoteUnavailableError: the store cannot be reached.
    """
    catalog = RemoteCatalog(latest=read_remote_latest(store))
    for tag in store.list_tags():
        if not layout.is_tag_name(tag):
            continue
        where = f"{store.describe()}/{layout.manifest_key(tag)}"
        try:
            raw = store.get_bytes(layout.manifest_key(tag), MAX_MANIFEST_BYTES)
        except RemoteUnavailableError:
            raise
        except RemoteError as error:  # too large to be a manifest
            catalog.damaged[tag] = f"{where}: {error}"
            continue
        if raw is None:
            if store.list_keys(layout.report_prefix(tag)):
                catalog.uploads.append(tag)
            continue
        try:
            manifest = parse_manifest(raw, where)
        except ManifestError as error:
            catalog.damaged[tag] = str(error)
            continue
        if manifest.tag != tag:
            catalog.damaged[tag] = f"{where} names tag {excerpt(manifest.tag)}: a copy, not ours"
            continue
        catalog.complete[tag] = manifest
    return catalog


def read_remote_latest(store: ObjectStore) -> Optional[str]:
    """The tag the remote ``latest`` names, or None when it is missing or not one tag."""
    try:
        raw = store.get_bytes(layout.latest_key(), LATEST_LIMIT)
    except RemoteUnavailableError:
        raise
    except RemoteError as error:
        logger.warning("ignoring %s/latest: %s", store.describe(), error)
        return None
    if raw is None:
        return None
    try:
        text = raw.decode().strip()
    except UnicodeDecodeError:
        return None
    return text if text and tag_problem(text) is None else None
