"""Checkpoint directories as a commit leaves them, written with the format layer alone (no engine, no op)."""

from ds_fastckpt.format.manifest import FileRecord, Manifest, write_manifest


def commit(save_dir, tag, sequence, step=None):
    """``save_dir/tag`` holding one 7-byte file and a manifest naming it; ``sequence`` orders the commits."""
    tag_dir = save_dir / tag
    tag_dir.mkdir()
    (tag_dir / "model.pt").write_bytes(b"weights")
    write_manifest(tag_dir, Manifest(tag=tag, step=step, sequence=sequence, committed_unix_ns=sequence,
                                     world_size=1, deepspeed_version="x", ds_fastckpt_version="y",
                                     files=[FileRecord(path="model.pt", bytes=7, crc32c=1)]), fsync=False)
    return tag_dir
