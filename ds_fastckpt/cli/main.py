"""``python -m ds_fastckpt`` / ``ds-fastckpt``: look after checkpoint directories without writing scripts.

    ds-fastckpt ls DIR [--json] [--keep-last N] [--keep-every K] [--config ds_config.json]
                       [--remote URL] [--endpoint-url URL]
    ds-fastckpt ls s3://BUCKET/PREFIX [--json] [--keep-last N] [--keep-every K] [--config ds_config.json]
                       [--endpoint-url URL]
    ds-fastckpt verify DIR|s3://BUCKET/PREFIX [TAG ...] [--endpoint-url URL]
    ds-fastckpt prune DIR --keep-last N [--keep-every K] [--dry-run]
    ds-fastckpt prune s3://BUCKET/PREFIX --keep-last N [--keep-every K] [--dry-run]
                       [--leftovers-older-than SECONDS] [--endpoint-url URL]
    ds-fastckpt bench [--dir D] [--size 1GiB] [--rounds 3] [--crc32-both] [--plot out.png] [tuning options]
    ds-fastckpt doctor [DIR]

An ``s3://`` target is the remote tier a job replicates to (``replicate.url``):
its checkpoints listed, verified (each file downloaded and checked) or
rotated. ``ls DIR`` shows which checkpoints the remote tier holds when the
engine noted where it replicates (or ``--remote`` names it). Credentials and
the endpoint come the standard AWS ways (``AWS_ENDPOINT_URL``, ...);
``--endpoint-url`` overrides the endpoint.

Exit status: 0 when all is well, 1 when something is wrong (a damaged file,
a failed check, an unreachable remote tier), 2 for a usage error.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from ds_fastckpt.cli import remote_ls, remote_prune, remote_verify
from ds_fastckpt.cli import verify as cli_verify
from ds_fastckpt.cli.arguments import integer_at_least
from ds_fastckpt.cli.output import say, warn
from ds_fastckpt.cli.remote_ls import DEFAULT_LEFTOVER_AGE_S
from ds_fastckpt.cli.remote_target import RemoteTier, add_endpoint_argument, is_remote, tier_of_save_dir
from ds_fastckpt.cli.table import print_table
from ds_fastckpt.decisions.resume import choose_resume_tag, read_latest
from ds_fastckpt.decisions.retention import RetentionPolicy, policy_from_config
from ds_fastckpt.decisions.rotation import Rotation
from ds_fastckpt.engine.config import ConfigError, FastAioConfig, parse_fast_aio
from ds_fastckpt.format.integrity import CheckpointIntegrityError
from ds_fastckpt.format.names import REMOTE_NOTE_NAME
from ds_fastckpt.format.records import CheckpointRecord, scan
from ds_fastckpt.remote.store import RemoteError


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        return args.run(args)
    except (OSError, ConfigError, ValueError, RemoteError) as error:
        warn(f"ds-fastckpt {args.command}: {error}")
        return 1


def _parser() -> argparse.ArgumentParser:
    from ds_fastckpt.cli import bench as cli_bench
    from ds_fastckpt.cli import doctor as cli_doctor

    parser = argparse.ArgumentParser(prog="ds-fastckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")

    ls = commands.add_parser("ls", help="list checkpoints: complete or not, size, latest, resume, next to rotate")
    ls.add_argument("dir", help=_TARGET_HELP)
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    _policy_arguments(ls, required=False)
    ls.add_argument("--config", type=Path, help="take keep_last/keep_every from this ds_config.json (for s3://, "
                                                "those of its replicate section)")
    ls.add_argument("--remote", metavar="URL", help="with a save_dir: the remote tier to compare with (default: "
                                                    f"the one the engine noted in {REMOTE_NOTE_NAME})")
    add_endpoint_argument(ls)
    ls.set_defaults(run=_ls)

    verify = commands.add_parser("verify", help="check sizes and CRC-32C of files against their manifests")
    verify.add_argument("dir", help=_TARGET_HELP)
    verify.add_argument("tags", nargs="*", help="checkpoints to verify (default: every complete one)")
    add_endpoint_argument(verify)
    verify.set_defaults(run=_verify)

    prune = commands.add_parser("prune", help="apply the rotation policy offline")
    prune.add_argument("dir", help=_TARGET_HELP)
    _policy_arguments(prune, required=True)
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    prune.add_argument("--leftovers-older-than", type=integer_at_least(0), default=int(DEFAULT_LEFTOVER_AGE_S),
                       metavar="SECONDS", help="s3:// only: delete unfinished uploads untouched this long (default "
                                               "%(default)s; a younger one may still be running)")
    add_endpoint_argument(prune)
    prune.set_defaults(run=_prune)

    bench = commands.add_parser("bench", help="measure write throughput of this disk, side by side")
    cli_bench.add_arguments(bench)
    bench.set_defaults(run=cli_bench.run)

    doctor = commands.add_parser("doctor", help="check libaio, the op, O_DIRECT, space and versions")
    doctor.add_argument("dir", nargs="?", type=Path, default=Path("."))
    doctor.set_defaults(run=cli_doctor.run)
    return parser


_TARGET_HELP = "a save_dir, or s3://bucket/prefix: the remote tier"


def _policy_arguments(parser, required: bool) -> None:
    parser.add_argument("--keep-last", type=integer_at_least(0), required=required,
                        help="complete checkpoints to keep, newest by commit; 0 keeps all")
    parser.add_argument("--keep-every", type=integer_at_least(0), default=0,
                        help="also keep checkpoints whose step is a multiple of this")


def _existing_dir(target: str) -> Path:
    path = Path(target)
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


def _policy(args, remote: bool) -> Tuple[RetentionPolicy, Optional[str]]:
    """The retention policy the options (or ``--config``) give, and the endpoint ``--config`` names for ``remote``."""
    if getattr(args, "config", None) is None:
        return policy_from_config(_options(args.keep_last or 0, args.keep_every)), None
    options = parse_fast_aio(json.loads(args.config.read_text()).get("checkpoint") or {}, check_host=False)
    if not remote:
        return policy_from_config(options), None
    if options.replicate is None:  # no remote policy configured: the remote tier keeps everything
        return policy_from_config(_options(0, 0)), None
    return policy_from_config(options.replicate), options.replicate.endpoint_url


def _rows(save_dir: Path, records: List[CheckpointRecord], policy: RetentionPolicy,
          resume_tag: Optional[str]) -> List[dict]:
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
    if is_remote(args.dir):
        policy, configured_endpoint = _policy(args, remote=True)
        return remote_ls.run(args, RemoteTier(args.dir, args.endpoint_url or configured_endpoint), policy)
    save_dir = _existing_dir(args.dir)
    policy, _ = _policy(args, remote=False)
    resume_tag, why = _resume_choice(save_dir)
    records = scan(save_dir, include_not_ours=True)
    rows = _rows(save_dir, records, policy, resume_tag)
    remote_only = _mark_replicated(save_dir, records, rows, args)
    if args.json:
        say(json.dumps(rows, indent=1))
        return 0
    footer = [f"remote only: {', '.join(remote_only)}"] if remote_only else []
    print_table(rows, f"(no ds_fastckpt checkpoints in {save_dir})", footer + ([f"resume: {why}"] if rows else []))
    return 0


def _mark_replicated(save_dir: Path, records: List[CheckpointRecord], rows: List[dict], args) -> List[str]:
    """Adds ``replicated`` to each row when a remote tier is known; returns the checkpoints it alone holds."""
    tier = tier_of_save_dir(save_dir, args.remote, args.endpoint_url)
    if tier is None:
        return []
    marks, remote_only, unreadable = remote_ls.replicated_marks(tier, [record.manifest for record in records])
    if unreadable is not None:
        warn(f"ds-fastckpt ls: cannot tell which checkpoints are replicated: {unreadable}")
    for row, mark in zip(rows, marks):
        row["replicated"] = mark
    return remote_only


def _verify(args) -> int:
    if is_remote(args.dir):
        return remote_verify.run(args, RemoteTier(args.dir, args.endpoint_url))
    return cli_verify.run(args)


def _prune(args) -> int:
    if is_remote(args.dir):
        policy, _ = _policy(args, remote=True)
        return remote_prune.run(args, RemoteTier(args.dir, args.endpoint_url), policy)
    save_dir = _existing_dir(args.dir)
    rotation = Rotation(_policy(args, remote=False)[0])
    doomed = rotation.choose(save_dir) if args.dry_run else rotation.apply(save_dir)
    for record in doomed:
        say(f"{'would delete' if args.dry_run else 'deleted'} {save_dir / record.name}")
    if not doomed:
        say("nothing to delete")
    return 0
