"""Loading checkpoint files against their manifest: what ``verify`` checks, when, and how damage is reported.

``verify`` "size" checks before the load that every file exists with its
recorded size and the two ends of a torch.save archive, which is cheap;
"checksum" also checks every byte's CRC-32C before ``torch.load`` sees any.
When a file the manifest lists still fails to deserialize, its CRC-32C is
checked then: damage is reported as such (``CheckpointIntegrityError``
naming the file), never as torch's "not a ZIP archive", an AssertionError
from deep inside, or a refused pickle.
"""

import dataclasses
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ds_fastckpt.decisions.resume import choose_resume_tag
from ds_fastckpt.engine import collectives
from ds_fastckpt.engine.config import FastAioConfig
from ds_fastckpt.format import safe_load
from ds_fastckpt.format.integrity import CheckpointIntegrityError, check_checksum, check_files, check_size
from ds_fastckpt.format.manifest import FileRecord, Manifest, read_manifest
from ds_fastckpt.format.names import MANIFEST_NAME
from ds_fastckpt.native.op import load_op
from ds_fastckpt.native.reader import MemoryFile, read_file, start_reading
from ds_fastckpt.native.tuning import DEFAULT_TUNING


class VerifiedLoader:
    """Reads checkpoint files for one engine, checking them against their manifests as ``verify`` says.

    Args:
        options: the engine's ``fast_aio`` options.
        tuning: ``block_size`` and ``queue_depth`` for the O_DIRECT reads.
        gather: the engine's bounded all-gather, ``gather(obj, what_fails) -> [obj of every rank]``.
        node_local: each node has its own copy of save_dir (``use_node_local_storage``), whose
            manifest lists that node's files only, so every rank checks all of them.
    """

    def __init__(self, options: FastAioConfig, tuning: Dict[str, int], gather: Callable[[object, str], list],
                 node_local: bool = False):
        self.options = options
        self.tuning = tuning
        self._gather = gather
        self._node_local = node_local
        self._manifests: Dict[Path, Optional[Manifest]] = {}
        self._checksummed: Optional[Path] = None  # the tag dir damage_of last found intact byte by byte
        self._loading_checksummed: Optional[Path] = None  # the tag dir being loaded, if it is that one

    def forget(self, tag_dir: Path) -> None:
        """Drops what is known of ``tag_dir``: it was saved again or removed."""
        self._manifests.pop(tag_dir, None)
        if self._checksummed == tag_dir:
            self._checksummed = None
        if self._loading_checksummed == tag_dir:
            self._loading_checksummed = None

    def verify_before_load(self, tag_dir: Path) -> None:
        """Checks that every file of a manifest-carrying tag dir exists with its size and archive ends (verify on).

        Raises:
            ManifestError: when the manifest cannot be read.
            CheckpointIntegrityError: naming the first damaged file.
        """
        self._manifests.pop(tag_dir, None)  # another job may have saved this tag again since
        self._loading_checksummed = tag_dir if self._checksummed == tag_dir else None
        self._checksummed = None  # good for this load only
        manifest = self._manifest_of(tag_dir)
        if manifest is not None and self.options.verify != "off":
            check_files(tag_dir, manifest)

    def resume_tag(self, save_dir: Path) -> Tuple[Optional[str], str]:
        """The tag ``load_checkpoint(save_dir)`` resumes from, and why. Every rank must call it.

        See ``resume.choose_resume_tag``; with ``skip_damaged_on_resume`` the
        candidates are checked (``damage_of``) and damaged ones are skipped.
        """
        if not self.options.skip_damaged_on_resume:
            return choose_resume_tag(save_dir)
        return choose_resume_tag(save_dir, lambda record: self.damage_of(save_dir.absolute() / record.name,
                                                                         record.manifest))

    def damage_of(self, tag_dir: Path, manifest: Manifest) -> Optional[str]:
        """Why the checkpoint in ``tag_dir`` is damaged, or None when it is intact. Every rank must call it.

        Each rank checks a share of the files (sizes and archive ends; CRC-32C
        too with verify "checksum", which the load then does not repeat), and
        every rank gets the same answer.
        """
        rank, world = (0, 1) if self._node_local else (collectives.rank(), collectives.world_size())
        share = dataclasses.replace(manifest, files=manifest.files[rank::world])
        damage = None
        try:
            check_files(tag_dir, share)
            if self.options.verify == "checksum":
                for record in share.files:
                    path = tag_dir / record.path
                    check_checksum(path, record, load_op().crc32c(read_file(path, **self.tuning)))
        except (CheckpointIntegrityError, OSError) as error:
            damage = str(error)
        found = [report for report in self._gather(damage, f"checking {tag_dir} before resuming") if report]
        if found:
            return found[0]
        if self.options.verify == "checksum":
            self._checksummed = tag_dir
        return None

    def load(self, path: Path, map_location=None):
        """``torch.load`` of ``path``, checked against its manifest as ``verify`` says.

        Raises:
            CheckpointIntegrityError: the file differs from its manifest.
            UnsafeCheckpointError: it needs objects outside the allowlist.
            OSError: it cannot be read (errno and path kept).
        """
        tag_dir, record = self._record_for(path) if self.options.verify != "off" else (None, None)
        try:
            if record is None or self.options.verify == "size" or tag_dir == self._loading_checksummed:
                # Reading and deserializing overlap; the files were checked before the load began.
                loaded, data = load_file(path, map_location=map_location, trusted=self.options.trusted_pickles,
                                         **self.tuning)
                if record is not None:
                    check_size(path, record, size=len(data))  # the file may have changed since that check
                return loaded
            # "checksum": every byte is checked before torch.load sees any, so damage is reported as such.
            data = read_file(path, **self.tuning)
            check_size(path, record, size=len(data))
            check_checksum(path, record, load_op().crc32c(data))
            return safe_load.load(MemoryFile(data), path=path, map_location=map_location,
                                  trusted=self.options.trusted_pickles)
        except (CheckpointIntegrityError, OSError):
            raise
        except Exception as error:  # torch refused or choked: damage, or content that is really refused?
            if record is None:
                raise  # no manifest to hold it against
            try:
                check_checksum(path, record, load_op().crc32c(read_file(path, **self.tuning)))
            except CheckpointIntegrityError as damage:
                raise damage from error
            raise

    def _manifest_of(self, tag_dir: Path) -> Optional[Manifest]:
        if tag_dir not in self._manifests:
            self._manifests[tag_dir] = read_manifest(tag_dir)
        return self._manifests[tag_dir]

    def _record_for(self, path: Path) -> Tuple[Optional[Path], Optional[FileRecord]]:
        for tag_dir in path.absolute().parents:
            if (tag_dir / MANIFEST_NAME).exists():
                manifest = self._manifest_of(tag_dir)
                relative = path.absolute().relative_to(tag_dir).as_posix()
                return tag_dir, next((record for record in manifest.files if record.path == relative), None)
        return None, None


def load_file(path, *, map_location=None, trusted: bool = False, block_size: int = DEFAULT_TUNING.block_size,
              queue_depth: int = DEFAULT_TUNING.queue_depth):
    """``torch.load`` of ``path``, reading it with O_DIRECT while it is being deserialized.

    The reads start with the archive's end (its directory), then go front to
    back; ``torch.load`` copies each record into its tensor as soon as that
    record has arrived, so reading and deserializing overlap.

    Returns:
        What ``torch.load`` returns, and the file's bytes (for checksumming).
    """
    reader, data = start_reading(path, block_size, queue_depth)
    try:
        loaded = safe_load.load(MemoryFile(data, wait=reader.wait), path=path, map_location=map_location,
                                trusted=trusted)
    finally:
        reader.finish()
    return loaded, data
