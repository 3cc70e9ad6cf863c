"""Where the operator commands write: results to stdout, diagnostics and progress to stderr."""

import sys


def say(line: str = "") -> None:
    sys.stdout.write(f"{line}\n")


def warn(line: str) -> None:
    sys.stderr.write(f"{line}\n")
