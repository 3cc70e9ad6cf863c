"""``ds-fastckpt``: operator commands over save_dirs (ls, verify, prune, doctor, bench)."""

from ds_fastckpt.cli.main import main

__all__ = ["main"]
