"""``python -m ds_fastckpt`` / ``ds-fastckpt``: look after checkpoint directories without writing scripts.

    ds-fastckpt ls DIR [--json] [--keep-last N] [--keep-every K] [--config ds_config.json]
    ds-fastckpt verify DIR [TAG ...]
    ds-fastckpt prune DIR --keep-last N [--keep-every K] [--dry-run]
    ds-fastckpt bench [--dir D] [--size 1GiB] [--rounds 3] [--crc32-both] [--plot out.png] [tuning options]
    ds-fastckpt doctor [DIR]

Exit status: 0 when all is well, 1 when something is wrong (a damaged file,
a failed check), 2 for a usage error.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from ds_fastckpt.cli.arguments import integer_at_least
from ds_fastckpt.cli.output import say, warn
from ds_fastckpt.decisions.resume import choose_resume_tag, read_latest
from ds_fastckpt.decisions.retention import RetentionPolicy, policy_from_config
from ds_fastckpt.decisions.rotation import Rotation
from ds_fastckpt.engine.config import ConfigError, FastAioConfig, parse_fast_aio
from ds_fastckpt.format.integrity import CheckpointIntegrityError
from ds_fastckpt.format.records import CheckpointRecord, scan


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        return args.run(args)
    except (OSError, ConfigError, ValueError) as error:
        warn(f"ds-fastckpt {args.command}: {error}")
        return 1


def _parser() -> argparse.ArgumentParser:
    from ds_fastckpt.cli import bench as cli_bench
    from ds_fastckpt.cli import doctor as cli_doctor
    from ds_fastckpt.cli import verify as cli_verify

    parser = argparse.ArgumentParser(prog="ds-fastckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")

    ls = commands.add_parser("ls", help="list checkpoints: complete or not, size, latest, resume, next to rotate")
    ls.add_argument("dir", type=Path)
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    _policy_arguments(ls, required=False)
    ls.add_argument("--config", type=Path, help="take keep_last/keep_every from this ds_config.json")
    ls.set_defaults(run=_ls)

    verify = commands.add_parser("verify", help="check sizes and CRC-32C of files against their manifests")
    verify.add_argument("dir", type=Path)
    verify.add_argument("tags", nargs="*", help="checkpoints to verify (default: every complete one)")
    verify.set_defaults(run=cli_verify.run)

    prune = commands.add_parser("prune", help="apply the rotation policy offline")
    prune.add_argument("dir", type=Path)
    _policy_arguments(prune, required=True)
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    prune.set_defaults(run=_prune)

    bench = commands.add_parser("bench", help="measure write throughput of this disk, side by side")
    cli_bench.add_arguments(bench)
    bench.set_defaults(run=cli_bench.run)

    doctor = commands.add_parser("doctor", help="check libaio, the op, O_DIRECT, space and versions")
    doctor.add_argument("dir", nargs="?", type=Path, default=Path("."))
    doctor.set_defaults(run=cli_doctor.run)
    return parser


def _policy_arguments(parser, required: bool) -> None:
    parser.add_argument("--keep-last", type=integer_at_least(0), required=required,
                        help="complete checkpoints to keep, newest by commit; 0 keeps all")
    parser.add_argument("--keep-every", type=integer_at_least(0), default=0,
                        help="also keep checkpoints whose step is a multiple of this")


def _existing_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(2, "not a checkpoint directory", str(path))
    return path


def _options(keep_last: int, keep_every: int) -> FastAioConfig:
    """The engine's options with these retention values, checked and completed as the engine's config is."""
    return parse_fast_aio({"fast_aio": {"keep_last": keep_last, "keep_every": keep_every}}, check_host=False)


def _resume_choice(save_dir: Path) -> Tuple[Optional[str], str]:
    """What ``load_checkpoint(save_dir)`` without a tag would resume from, and why (``resume``)."""
    try:
        return choose_resume_tag(save_dir)
    except CheckpointIntegrityError as error:
        return None, f"none: the resume would stop: {error}"


def _rows(save_dir: Path, policy: RetentionPolicy, resume_tag: Optional[str]) -> List[dict]:
    records = scan(save_dir, include_not_ours=True)
    latest = read_latest(save_dir)
    # What the engine's next rotation would delete: chosen as it chooses, nothing deleted.
    doomed = {record.name for record in Rotation(policy).choose(save_dir, records)}
    now = time.time()
    rows = []
    for record in records:
        manifest = record.manifest
        on_disk, file_count = (0, 0) if manifest else _on_disk(save_dir / record.name)
        rows.append({
            "tag": record.tag,
            "step": manifest.step if manifest else None,
            "complete": record.complete,
            "state": _state(record),
            "bytes": manifest.total_bytes if manifest else on_disk,
            "files": len(manifest.files) if manifest else file_count,
            "age_s": round(now - (manifest.committed_unix_ns / 1e9 if manifest else
                                  os.lstat(save_dir / record.name).st_mtime), 1),
            "latest": record.complete and record.tag == latest,
            "resume": record.complete and record.tag == resume_tag,
            "next_to_delete": record.name in doomed,
        })
    return rows


def _on_disk(directory: Path) -> Tuple[int, int]:
    """Bytes and count of the regular files under ``directory``; symlinks and unreadable folders are skipped."""
    total, count, folders = 0, 0, [directory]
    while folders:  # a loop, not recursion: a hostile tree may be deeper than Python's recursion limit
        try:
            with os.scandir(folders.pop()) as entries:
                listed = list(entries)
        except OSError:
            continue  # gone or unreadable: counted as empty
        for entry in listed:
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    count += 1
            except OSError:
                continue  # removed since it was listed
    return total, count


def _state(record: CheckpointRecord) -> str:
    if record.not_ours:
        return "not ours"
    if record.complete:
        return "complete"
    if record.damaged:
        return "damaged"
    return {"pending": "interrupted save", "spare": "spare (the next save writes over it)"}.get(record.leftover,
                                                                                               "being deleted")


def _ls(args) -> int:
    save_dir = _existing_dir(args.dir)
    if args.config is not None:
        options = parse_fast_aio(json.loads(args.config.read_text()).get("checkpoint") or {}, check_host=False)
    else:
        options = _options(args.keep_last or 0, args.keep_every)
    resume_tag, why = _resume_choice(save_dir)
    rows = _rows(save_dir, policy_from_config(options), resume_tag)
    if args.json:
        say(json.dumps(rows, indent=1))
        return 0
    header = f"{'TAG':<24} {'STEP':>8} {'STATE':<17} {'SIZE':>10} {'FILES':>5} {'AGE':>8}  NOTE"
    say(header)
    for row in rows:
        notes = [text for flag, text in ((row["latest"], "latest"), (row["resume"], "resume"),
                                         (row["next_to_delete"], "next to rotate")) if flag]
        step = "-" if row["step"] is None else row["step"]
        say(f"{row['tag']:<24} {step:>8} {row['state']:<17} {_size(row['bytes']):>10} {row['files']:>5} "
              f"{_age(row['age_s']):>8}  {', '.join(notes)}")
    if not rows:
        say(f"(no ds_fastckpt checkpoints in {save_dir})")
    else:
        say(f"resume: {why}")
    return 0


def _prune(args) -> int:
    save_dir = _existing_dir(args.dir)
    rotation = Rotation(policy_from_config(_options(args.keep_last, args.keep_every)))
    doomed = rotation.choose(save_dir) if args.dry_run else rotation.apply(save_dir)
    for record in doomed:
        say(f"{'would delete' if args.dry_run else 'deleted'} {save_dir / record.name}")
    if not doomed:
        say("nothing to delete")
    return 0


def _size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    value = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}"
    return f"{seconds:.0f}s"
