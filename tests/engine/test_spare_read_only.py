"""A checkpoint made read-only (``chmod -R a-w``) by a user without CAP_DAC_OVERRIDE never makes a save fail.

Rotation cannot delete it, so it leaves it where it is, complete and loadable, and logs that it could not;
it never becomes the spare, and nothing is written over. The tests run as root, which may write anything, so
the job runs here in a child process as the unprivileged uid 65534 (``setpriv``), in a directory it owns;
this module is that child's script too (``python -m tests.engine.test_spare_read_only WORKDIR``).
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.ds_helpers import REPO

NOBODY = 65534


def files_of(directory: Path) -> dict:
    """Every file under ``directory``: its SHA-256 and mode."""
    return {str(path.relative_to(directory)): [hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode]
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_a_read_only_checkpoint_is_left_alone_and_saves_go_on(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the job as a second, unprivileged uid (setpriv --reuid)")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run the job as an unprivileged uid")
    from ds_fastckpt.native.op import load_op

    work = Path(tempfile.mkdtemp(prefix="ds_fastckpt_read_only_"))  # pytest's tmp dirs are private to root
    try:
        # root's build cache is not readable to it: the op, and DeepSpeed's CPU comm op, built already
        shutil.copy(load_op().__file__, work / "ds_fastckpt_op.so")
        builds = Path(load_op().__file__).parents[1]
        if (builds / "deepspeed_shm_comm").is_dir():
            shutil.copytree(builds / "deepspeed_shm_comm", work / "extensions" / "deepspeed_shm_comm",
                            ignore=shutil.ignore_patterns("lock"))
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(work)], check=True)
        env = {key: value for key, value in os.environ.items()
               if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(HOME=str(work), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                   TORCH_EXTENSIONS_DIR=str(work / "extensions"))
        result = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                 sys.executable, "-m", "tests.engine.test_spare_read_only", str(work)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        report = json.loads((work / "report.json").read_text())
        assert report["uid"] == NOBODY
        assert report["errors"] == []  # no save failed, both loads worked
        assert report["read_only_after"] == report["read_only_before"]  # bytes and modes untouched
        assert all(not mode & 0o222 for _, mode in report["read_only_before"].values())
        assert report["latest_loaded"] == "global_step3" and report["latest_state_equal"]
        assert report["read_only_state_equal"]
        assert any("could not delete global_step1" in line and "not writable" in line for line in report["logs"])
        assert report["dirs"] == [".global_step2.ds_fastckpt-spare", "global_step1", "global_step3"]
    finally:
        shutil.rmtree(work)


def _job(work: Path) -> None:
    """The job, as uid 65534: save, chmod -R a-w the first checkpoint, save twice more, resume both."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ds_fastckpt.ds_fastckpt_op", work / "ds_fastckpt_op.so")
    op = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(op)
    sys.modules["ds_fastckpt.ds_fastckpt_op"] = op  # FastCkptBuilder.load imports it as prebuilt

    from tests.ds_helpers import full_state, init_engine, single_process_env, train

    single_process_env()
    logs = []

    class Collect(logging.Handler):
        def emit(self, record):
            logs.append(record.getMessage())

    logging.getLogger("ds_fastckpt").addHandler(Collect(logging.WARNING))
    save_dir = work / "ckpts"
    engine = init_engine(1, {"keep_last": 1})  # recycle_retired: true by default
    errors = []
    train(engine, 1)
    engine.save_checkpoint(save_dir)
    first = full_state(engine)
    subprocess.run(["chmod", "-R", "a-w", str(save_dir / "global_step1")], check=True)
    before = files_of(save_dir / "global_step1")
    for _ in range(2):
        train(engine, 1)
        try:
            engine.save_checkpoint(save_dir)
        except Exception as error:  # the defect: PermissionError from writing over the read-only spare
            errors.append(f"{type(error).__name__}: {error}")
    newest = full_state(engine)
    engine.destroy()
    report = {"uid": os.getuid(), "errors": errors, "logs": logs,
              "dirs": sorted(entry.name for entry in save_dir.iterdir() if entry.is_dir()),
              "read_only_before": before, "read_only_after": files_of(save_dir / "global_step1"),
              "latest_loaded": None, "latest_state_equal": False, "read_only_state_equal": False}
    # With the safe loader: the interpreter this uid runs may pickle ZeroStageEnum by name (Debian's 3.11.2).
    resumed = init_engine(1, {"keep_last": 1}, seed=9)
    try:
        path, _ = resumed.load_checkpoint(save_dir)
        report.update(latest_loaded=Path(path).parent.name, latest_state_equal=_same(newest, full_state(resumed)))
        resumed.load_checkpoint(save_dir, tag="global_step1")
        report.update(read_only_state_equal=_same(first, full_state(resumed)))
    except Exception as error:  # reported, so that the test shows what failed first
        errors.append(f"load: {type(error).__name__}: {error}")
    resumed.destroy()
    (work / "report.json").write_text(json.dumps(report))


def _same(expected: dict, actual: dict) -> bool:
    import torch

    return expected.keys() == actual.keys() and all(
        torch.equal(value, actual[key]) if isinstance(value, torch.Tensor) else value == actual[key]
        for key, value in expected.items())


if __name__ == "__main__":
    _job(Path(sys.argv[1]))
