"""Files a client writes beside the tag directory in its save_dir, replicated with the checkpoint.

The Hugging Face Trainer saves each checkpoint into ``checkpoint-N/``: the
DeepSpeed tag directory (ours, with its manifest), and beside it its own
``trainer_state.json``, RNG states, model config and weights. A resume needs
both, so a ``checkpoint-N`` restored from the remote tier must get both back.
These files go to ``<tag>/ds_fastckpt_client/<name>`` and are listed, with
size and CRC-32C, in the remote manifest's ``client_files``.

Which files: the regular files directly in the save_dir (never a symlink,
never a subdirectory), except ``latest`` and hidden names (our lock, notes
and temporary files).
"""

import os
import stat
from pathlib import Path
from typing import List, Tuple

from ds_fastckpt.format.names import LATEST_NAME
from ds_fastckpt.native.op import load_op

_CHUNK = 16 << 20


def client_file_names(save_dir: Path) -> List[str]:
    """The names of the client files in ``save_dir``, sorted; none when it cannot be listed.

    Raises:
        OSError: when ``save_dir`` exists but cannot be listed, with errno and path.
    """
    names = []
    with os.scandir(save_dir) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name == LATEST_NAME:
                continue
            if stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                names.append(entry.name)
    return sorted(names)


def file_digest(fd: int) -> Tuple[int, int]:
    """``(size, CRC-32C)`` of the file open at ``fd``, read once from its start (``pread``: no shared offset moves).

    Raises:
        OSError: with errno.
    """
    op, size, crc = load_op(), 0, 0
    while chunk := os.pread(fd, _CHUNK, size):
        crc = op.crc32c(chunk, crc)
        size += len(chunk)
    return size, crc
