"""The environment of a one-rank DeepSpeed job, for benchmarks run as plain scripts (no launcher)."""

import os
import socket


def world_of_one() -> None:
    """Sets the launcher's variables for rank 0 of 1 on a free local port, keeping any already set."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
