"""``ds-fastckpt doctor``: is this host and directory ready for fast, durable checkpoints?"""

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Tuple

from ds_fastckpt.cli.output import say

Check = Tuple[bool, str, str]  # passed, what was found, what to do about it


def _libaio() -> Check:
    from ds_fastckpt.native.op_builder import FastCkptBuilder

    builder = FastCkptBuilder()
    if builder.is_compatible():
        return True, "libaio headers and library found", ""
    return False, "libaio is missing", builder.error_log or "install libaio-dev (Debian/Ubuntu) or libaio-devel"


def _op() -> Check:
    from ds_fastckpt.native.op import load_op

    try:
        module = load_op()
    except Exception as error:  # reported as a failed check, with what to do
        return False, f"the op does not build: {error}", "check the compiler output above; reinstall ds_fastckpt"
    return True, f"op loaded from {getattr(module, '__file__', module)}", ""


def _direct_io(directory: Path) -> Check:
    from ds_fastckpt.native.writer import AioFileWriter

    with tempfile.TemporaryDirectory(dir=directory, prefix=".ds_fastckpt_doctor_") as scratch:
        with AioFileWriter(Path(scratch) / "probe", io_buffer_size=1 << 20) as writer:
            writer.write(b"\0" * 8192)
            direct = writer.is_direct
    block = _logical_block_size(directory)
    if not direct:
        return False, f"{directory} does not accept O_DIRECT", "writes fall back to buffered I/O + fsync (slower)"
    if block is not None and block > 4096:
        return False, f"logical block size {block} > 4096", "ds_fastckpt aligns to 4096; use another filesystem"
    return True, f"O_DIRECT works in {directory} (logical block size {block or 'unknown'})", ""


def _logical_block_size(directory: Path):
    device = os.stat(directory).st_dev
    base = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for candidate in (base / "queue" / "logical_block_size", base.parent / "queue" / "logical_block_size"):
        try:
            return int(candidate.resolve().read_text())
        except (OSError, ValueError):
            continue
    return None


def _free_space(directory: Path) -> Check:
    usage = shutil.disk_usage(directory)
    text = f"{usage.free / 1e9:.1f} GB free of {usage.total / 1e9:.1f} GB in {directory}"
    if usage.free < 0.05 * usage.total:
        return False, text, "less than 5% free: lower keep_last or free space before long runs"
    return True, text, ""


def _versions() -> Check:
    import deepspeed
    import torch

    return True, (f"Python {sys.version.split()[0]}, torch {torch.__version__}, "
                  f"DeepSpeed {deepspeed.__version__}"), ""


def _fast_file_writer_leak() -> Check:
    import deepspeed
    from packaging.version import Version

    version = Version(deepspeed.__version__.split("+")[0])
    if Version("0.17.0") <= version < Version("0.19.1"):
        return False, (f"DeepSpeed {version}'s FastFileWriter leaks one fd per save (fixed in 0.19.1); with "
                       "rotation the disk fills up"), "upgrade to deepspeed>=0.19.1, or use checkpoint engine fast_aio"
    return True, f"DeepSpeed {version} has no FastFileWriter fd leak", ""


def run(args) -> int:
    directory: Path = args.dir
    if not directory.is_dir():
        raise FileNotFoundError(2, "not a directory", str(directory))
    checks: List[Callable[[], Check]] = [_libaio, _op, lambda: _direct_io(directory), lambda: _free_space(directory),
                                         _versions, _fast_file_writer_leak]
    failed = 0
    for check in checks:
        passed, found, fix = check()
        say(f"{'ok  ' if passed else 'FAIL'} {found}")
        if not passed:
            failed += 1
            say(f"     fix: {fix}")
    say("all checks passed" if not failed else f"{failed} check(s) failed")
    return 0 if not failed else 1
