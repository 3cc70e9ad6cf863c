"""Run as a script: one process saves one checkpoint with ``replicate``, then ends normally or waits to be killed.

    python tests/remote/save_worker.py SAVE_DIR URL ENDPOINT WIDTH REPLICATE_JSON [FREEZE_PID] [READY_FILE]

``REPLICATE_JSON``: more keys of the ``replicate`` section. ``FREEZE_PID``: a process to SIGSTOP once the engine
exists (the S3 server, to make it hang from then on; 0 for none). ``READY_FILE``: created once the save returned,
after which the process sleeps until it is killed; without it the process ends right after the save.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.ds_helpers import init_engine, single_process_env, train  # noqa: E402
from tests.remote.replicas import replicate_options  # noqa: E402


class Endpoint:
    def __init__(self, url: str):
        self.endpoint_url = url


def main():
    save_dir, url, endpoint, width, extra = sys.argv[1:6]
    freeze_pid = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    ready = sys.argv[7] if len(sys.argv) > 7 else None
    single_process_env()
    options = replicate_options(url, Endpoint(endpoint), **json.loads(extra))
    engine = init_engine(1, {"keep_last": 1, "replicate": options}, width=int(width))
    if freeze_pid:
        os.kill(freeze_pid, signal.SIGSTOP)
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    if ready is not None:
        Path(ready).touch()
        time.sleep(600)


if __name__ == "__main__":
    main()
