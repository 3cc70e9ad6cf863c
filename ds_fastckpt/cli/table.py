"""How ``ds-fastckpt ls`` prints its rows, the same for a save_dir and for the remote tier."""

from typing import List, Optional, Sequence

from ds_fastckpt.cli.output import say

# The text of ``replicated`` (``ls SAVE_DIR`` with a remote tier): True, False, "differs", or None (unknown).
_REPLICATED_TEXT = {True: "yes", False: "-", "differs": "differs", None: "?"}


def print_table(rows: Sequence[dict], empty: str, footer: List[str]) -> None:
    """Prints ``rows`` as a table, or ``empty`` when there are none, then each line of ``footer``.

    A ``replicated`` column appears when the rows carry that field.
    """
    replicated = any("replicated" in row for row in rows)
    say(f"{'TAG':<24} {'STEP':>8} {'STATE':<17} {'SIZE':>10} {'FILES':>5} {'AGE':>8}  "
        + ("REPLICATED  " if replicated else "") + "NOTE")
    for row in rows:
        notes = [text for flag, text in ((row["latest"], "latest"), (row["resume"], "resume"),
                                         (row["next_to_delete"], "next to rotate")) if flag]
        step = "-" if row["step"] is None else row["step"]
        column = f"{_REPLICATED_TEXT[row.get('replicated', False)]:<10}  " if replicated else ""
        say(f"{row['tag']:<24} {step:>8} {row['state']:<17} {size_text(row['bytes']):>10} {row['files']:>5} "
            f"{age_text(row['age_s']):>8}  {column}{', '.join(notes)}".rstrip())
    if not rows:
        say(empty)
    for line in footer:
        say(line)


def size_text(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    value = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def age_text(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}"
    return f"{seconds:.0f}s"
