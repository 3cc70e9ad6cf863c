"""Hostile and shared save_dirs, built for real: a user's ``cp -r`` of a checkpoint, FIFOs, symlinks to /dev/zero
and to another file, a 10 MiB ``latest``, deeply nested and ill-typed manifests, manifest paths leaving the tag
directory.

What a user observes is asserted: rotation and ``prune`` leave the copy on disk and ``ls`` says "not ours";
``ls``, ``verify``, ``prune``, ``load_checkpoint`` and every later ``save_checkpoint`` return promptly (each runs
in a child process with a timeout and a memory cap, so a regression fails instead of hanging); what they print
and log is short, never another file's content, and errors name the file.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_fastckpt.cli.main import main
from ds_fastckpt.format.names import MANIFEST_NAME, PENDING_MARKER_NAME
from tests.ds_helpers import init_engine, single_process_env, train
from tests.hostile_helpers import SECRET, huge, link_to_dev_zero, link_to_secret, make_fifo, nested_json, promptly

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "hostile_worker.py"
INIT_TIMEOUT_S = 180  # an engine start on a loaded 2-core machine takes up to about a minute
STEP_TIMEOUT_S = 30  # a load or save of these tiny checkpoints takes well under a second
MAX_OUTPUT_CHARS = 3000  # everything printed and logged by one command: a few short lines


def checkpoint_dirs(save_dir):
    return sorted(path.name for path in save_dir.iterdir() if path.is_dir())


def edit_manifest(tag_dir, **changes):
    path = tag_dir / MANIFEST_NAME
    path.write_text(json.dumps({**json.loads(path.read_bytes()), **changes}))


def pending_with_marker(save_dir, plant):
    leftover = save_dir / ".global_step9.ds_fastckpt-tmp"
    leftover.mkdir()
    plant(leftover / PENDING_MARKER_NAME)


def cp_r(source, target):
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)


def escaping_path(save_dir, path):
    make_fifo(save_dir / "outside.pt")
    manifest = json.loads((save_dir / "global_step2" / MANIFEST_NAME).read_bytes())
    manifest["files"][0]["path"] = path
    (save_dir / "global_step2" / MANIFEST_NAME).write_text(json.dumps(manifest))


def copy_named_in_latest(save_dir):
    cp_r(save_dir / "global_step2", save_dir / "best_model")
    (save_dir / "latest").write_text("best_model")


MANIFEST2 = f"global_step2/{MANIFEST_NAME}"
# name -> (plant(save_dir), fast_aio, what load_checkpoint(save_dir) does: the tag it loads or (error, texts)),
# the damaged manifest if any.
SCENARIOS = {
    "cp -r copy": (lambda d: cp_r(d / "global_step2", d / "best_model"), {"keep_last": 1}, "global_step2", None),
    "copy named in latest": (copy_named_in_latest, {"keep_last": 1}, "global_step2", None),
    "fifo manifest": (lambda d: make_fifo(d / MANIFEST2), {},
                      ("CheckpointIntegrityError", ["it is a FIFO, not a regular file"]), MANIFEST2),
    "dev/zero manifest": (lambda d: link_to_dev_zero(d / MANIFEST2), {},
                          ("CheckpointIntegrityError", ["it is a symbolic link"]), MANIFEST2),
    "secret manifest": (lambda d: link_to_secret(d / MANIFEST2), {},
                        ("CheckpointIntegrityError", ["it is a symbolic link"]), MANIFEST2),
    "nested manifest": (lambda d: (d / MANIFEST2).write_bytes(nested_json()), {},
                        ("CheckpointIntegrityError", ["recursion limit exceeded"]), MANIFEST2),
    "string step with keep_every": (lambda d: edit_manifest(d / "global_step1", step="1"),
                                    {"keep_last": 1, "keep_every": 2, "skip_damaged_on_resume": True},
                                    "global_step2", f"global_step1/{MANIFEST_NAME}"),
    "string bytes": (lambda d: edit_manifest(d / "global_step2", files=[{"path": "x.pt", "bytes": "7", "crc32c": 1}]),
                     {}, ("CheckpointIntegrityError", ["files.0.bytes: Input should be a valid integer"]), MANIFEST2),
    "path with ..": (lambda d: escaping_path(d, "../outside.pt"), {},
                     ("CheckpointIntegrityError", ["'../outside.pt' has an empty, '.' or '..' component"]), MANIFEST2),
    "absolute path": (lambda d: escaping_path(d, str(d / "outside.pt")), {},
                      ("CheckpointIntegrityError", ["is absolute"]), MANIFEST2),
    "fifo marker": (lambda d: pending_with_marker(d, make_fifo), {}, "global_step2", None),
    "dev/zero marker": (lambda d: pending_with_marker(d, link_to_dev_zero), {}, "global_step2", None),
    "fifo latest": (lambda d: make_fifo(d / "latest"), {}, "global_step2", None),
    "dev/zero latest": (lambda d: link_to_dev_zero(d / "latest"), {}, "global_step2", None),
    "secret latest": (lambda d: link_to_secret(d / "latest"), {}, "global_step2", None),
    "10 MiB latest": (lambda d: huge(d / "latest"), {}, "global_step2", None),
}
NAMES = list(SCENARIOS)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """global_step1 and global_step2, complete; latest names global_step2."""
    single_process_env()
    save_dir = tmp_path_factory.mktemp("hostile") / "template"
    engine = init_engine(1, {"keep_last": 0})
    for _ in range(2):
        train(engine, 1)
        engine.save_checkpoint(save_dir)
    engine.destroy()
    return save_dir


def planted(template, where: Path, name: str) -> Path:
    save_dir = where / "ckpts"
    shutil.copytree(template, save_dir, symlinks=True)
    SCENARIOS[name][0](save_dir)
    return save_dir


@pytest.fixture(scope="module")
def engine_runs(template, tmp_path_factory):
    """Every scenario's load_checkpoint and two saves, run once in hostile_worker.py: {name: {step: result}}."""
    base = tmp_path_factory.mktemp("engine_runs")
    scenarios = []
    for index, name in enumerate(NAMES):
        save_dir = planted(template, base / str(index), name)
        scenarios.append({"name": name, "save_dir": str(save_dir), "fast_aio": SCENARIOS[name][1], "saves": 2})
    (base / "scenarios.json").write_text(json.dumps(scenarios))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    worker = subprocess.run([sys.executable, str(WORKER), str(base / "scenarios.json"), str(base / "results.jsonl"),
                             str(INIT_TIMEOUT_S), str(STEP_TIMEOUT_S)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=len(NAMES) * (INIT_TIMEOUT_S + 3 * STEP_TIMEOUT_S))
    assert worker.returncode == 0, worker.stderr[-3000:]
    runs = {name: {} for name in NAMES}
    for line in (base / "results.jsonl").read_text().splitlines():
        result = json.loads(line)
        runs[result["scenario"]][result["step"]] = result
    return {name: (Path(scenario["save_dir"]), runs[name]) for name, scenario in zip(NAMES, scenarios)}


def assert_prompt_and_short(name, steps, step):
    assert step in steps, f"{name}: {step} never ran: {steps}"
    assert steps[step]["error_type"] not in ("timeout", "died"), f"{name}: {step}: {steps[step]}"
    logged = steps[step]["log_chars"] + steps[step].get("error_chars", 0)
    assert logged < MAX_OUTPUT_CHARS, f"{name}: {step} logged {logged} characters: {steps[step]}"
    assert SECRET not in json.dumps(steps[step])


@pytest.mark.parametrize("name", NAMES)
def test_load_checkpoint_returns_promptly(engine_runs, name):
    save_dir, steps = engine_runs[name]
    _, _, expected_load, damaged = SCENARIOS[name]
    for step in ("init", "load"):
        assert_prompt_and_short(name, steps, step)
    load = steps["load"]
    if isinstance(expected_load, str):
        assert load["error_type"] is None and load["loaded"] == expected_load, load
    else:
        error_type, texts = expected_load
        assert load["error_type"] == error_type, load
        assert str(save_dir / damaged) in load["error"]  # the error names the file
        assert all(text in load["error"] for text in texts), load


@pytest.mark.parametrize("name", NAMES)
def test_every_later_save_returns_promptly_and_commits(engine_runs, name):
    save_dir, steps = engine_runs[name]
    damaged = SCENARIOS[name][3]
    for step in ("save1", "save2"):
        assert_prompt_and_short(name, steps, step)
        assert steps[step]["error_type"] is None, steps[step]
    assert (save_dir / "global_step4" / MANIFEST_NAME).is_file()
    assert (save_dir / "latest").read_text() == "global_step4"
    if damaged is not None:
        assert os.path.lexists(save_dir / damaged)  # a damaged checkpoint is never deleted


def test_rotation_leaves_the_cp_r_copy(engine_runs):
    save_dir, _ = engine_runs["cp -r copy"]
    # keep_last 1: rotation removed global_step1..3 but not the copy, which still holds every file
    assert checkpoint_dirs(save_dir) == [".global_step3.ds_fastckpt-spare", "best_model", "global_step4"]
    original = engine_runs["copy named in latest"][0]
    assert sorted(os.listdir(save_dir / "best_model")) == sorted(os.listdir(original / "best_model"))
    assert checkpoint_dirs(original) == [".global_step3.ds_fastckpt-spare", "best_model", "global_step4"]


def test_resume_ignores_hostile_latest_with_one_short_warning(engine_runs):
    for name in ("fifo latest", "dev/zero latest", "secret latest", "10 MiB latest"):
        save_dir, steps = engine_runs[name]
        logs = steps["load"]["logs"]
        assert any(f"ignoring {save_dir / 'latest'}" in message for message in logs), (name, logs)
        assert all(len(message) < 500 for message in logs), (name, logs)


def cli(*argv):
    return main([str(arg) for arg in argv])


@pytest.mark.parametrize("name", NAMES)
def test_cli_returns_promptly_with_short_output(template, tmp_path, name):
    save_dir = planted(template, tmp_path, name)
    _, _, expected_load, damaged = SCENARIOS[name]
    results = {}
    for argv in (["ls", save_dir], ["ls", save_dir, "--json"], ["verify", save_dir],
                 ["prune", save_dir, "--keep-last", "1"]):
        outcome = promptly(cli, *argv, timeout=60)
        assert outcome.error_type is None, (argv, outcome)
        assert outcome.output_chars < MAX_OUTPUT_CHARS, (argv, outcome.output_chars, outcome.text[:3000])
        assert SECRET not in outcome.text
        results[argv[0] if argv[-1] != "--json" else "json"] = outcome
    rows = {row["tag"]: row for row in json.loads(results["json"].stdout)}
    for tag in ("global_step1", "global_step2"):
        assert rows[tag]["state"] == ("damaged" if damaged == f"{tag}/{MANIFEST_NAME}" else "complete"), rows
    if name.endswith("latest"):
        assert not any(row["latest"] for row in rows.values())
    if damaged is not None:
        assert rows[damaged.split("/")[0]]["state"] == "damaged"
        assert results["verify"].value == 1
        assert str(save_dir / damaged) in results["verify"].stdout  # verify names the file
    else:
        assert results["verify"].value == 0, results["verify"].text
    assert results["prune"].value == 0
    if damaged is not None:
        assert os.path.lexists(save_dir / damaged)
    if name in ("path with ..", "absolute path"):  # the FIFO outside was neither opened nor reported on
        assert "CRC-32C" not in results["verify"].stdout and "not a regular file" not in results["verify"].stdout


@pytest.mark.parametrize("name", ["cp -r copy", "copy named in latest"])
def test_ls_lists_the_copy_as_not_ours_and_prune_leaves_it(template, tmp_path, name):
    save_dir = planted(template, tmp_path, name)
    outcome = promptly(cli, "ls", save_dir, "--json", timeout=60)
    rows = {row["tag"]: row for row in json.loads(outcome.stdout)}
    assert rows["best_model"] == {**rows["best_model"], "state": "not ours", "complete": False, "latest": False,
                                  "next_to_delete": False, "step": None}
    assert rows["best_model"]["files"] == len(os.listdir(save_dir / "global_step2"))
    table = promptly(cli, "ls", save_dir, "--keep-last", "1", timeout=60).stdout.splitlines()
    [line] = [line for line in table if line.startswith("best_model")]
    assert "not ours" in line and "next to rotate" not in line
    assert promptly(cli, "prune", save_dir, "--keep-last", "1", timeout=60).stdout.splitlines() == [
        f"deleted {save_dir / 'global_step1'}"]
    assert checkpoint_dirs(save_dir) == ["best_model", "global_step2"]
    before = {path.name: path.read_bytes() for path in (tmp_path / "ckpts" / "best_model").iterdir()}
    assert promptly(cli, "prune", save_dir, "--keep-last", "1", timeout=60).stdout == "nothing to delete\n"
    assert {path.name: path.read_bytes() for path in (save_dir / "best_model").iterdir()} == before
