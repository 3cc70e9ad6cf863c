"""Argument types shared by the commands: refused values become usage errors (exit 2) that say what is allowed."""

import argparse
from typing import Callable


def integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: use an integer >= {minimum}")
        return value

    return parse
