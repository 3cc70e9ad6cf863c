"""Many save + rotate cycles: descriptors, free space and memory stay flat (the seed's endurance run, small).

``make test`` runs 100 cycles; ``make test-long`` runs 500 (DS_FASTCKPT_ENDURANCE_CYCLES).
"""

import os
import resource

from ds_fastckpt import deleted_fds_under, open_fds_under
from ds_fastckpt.format.names import LOCK_NAME
from tests.ds_helpers import init_engine, train

CYCLES = int(os.environ.get("DS_FASTCKPT_ENDURANCE_CYCLES", "100"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def free_bytes(path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_save_rotate_cycles_stay_flat(tmp_path):
    engine = init_engine(1, {"keep_last": 2}, width=512)
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    checkpoint = sum(p.stat().st_size for p in (tmp_path / "global_step1").iterdir())
    for _ in range(2):
        train(engine, 1)
        engine.save_checkpoint(tmp_path)
    free_at_start, rss_at_start = free_bytes(tmp_path), rss_bytes()
    lowest_free, highest_rss = free_at_start, rss_at_start
    for _ in range(CYCLES):
        train(engine, 1)
        engine.save_checkpoint(tmp_path)
        assert deleted_fds_under(tmp_path) == []
        lowest_free = min(lowest_free, free_bytes(tmp_path))
        highest_rss = max(highest_rss, rss_bytes())
    assert [entry.target for entry in open_fds_under(tmp_path)] == [str(tmp_path / LOCK_NAME)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        f".global_step{engine.global_steps - 2}.ds_fastckpt-spare", f"global_step{engine.global_steps - 1}",
        f"global_step{engine.global_steps}"]
    # Other processes share this disk, so allow it some slack beyond one checkpoint.
    assert lowest_free > free_at_start - 2 * checkpoint - (64 << 20)
    assert highest_rss < rss_at_start + (64 << 20)
