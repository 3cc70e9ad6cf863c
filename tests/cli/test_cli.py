"""The operator commands on a directory made by examples/train.py, and on a damaged copy of it."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_fastckpt.cli.main import main
from ds_fastckpt.format.names import MANIFEST_NAME
from tests.ds_helpers import single_process_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """global_step20, 30 and 40 kept (keep_last 3 in examples/ds_config.json); latest names global_step40."""
    single_process_env()
    spec = importlib.util.spec_from_file_location("example_train", REPO / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    save_dir = tmp_path_factory.mktemp("cli") / "ckpts"
    module.main(["--save-dir", str(save_dir), "--steps", "40", "--save-every", "10", "--width", "64"])
    return save_dir


@pytest.fixture
def copy_of(trained, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(trained, target, symlinks=True)
    return target


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ls_table(trained, capsys):
    code, out, _ = run(capsys, "ls", trained, "--keep-last", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TAG", "STEP", "STATE"]
    # global_step10, retired by the last save's rotation, is the spare the next save writes over.
    assert [line.split()[0] for line in lines[1:5]] == ["global_step20", "global_step30", "global_step40",
                                                        "global_step10"]
    assert lines[1].endswith("next to rotate") and lines[3].endswith("latest, resume")
    assert "spare (the next save writes over it)" in lines[4]
    assert lines[5] == "resume: 'latest' names 'global_step40', a complete checkpoint"


def test_ls_marks_what_a_resume_takes_and_why(copy_of, capsys):
    (copy_of / "latest").write_text("global_step99")
    code, out, _ = run(capsys, "ls", copy_of, "--json")
    rows = json.loads(out)
    assert code == 0 and [row["tag"] for row in rows if row["resume"]] == ["global_step40"]
    (copy_of / "latest").write_text("global_step20")
    code, out, _ = run(capsys, "ls", copy_of)
    lines = out.splitlines()
    assert lines[1].startswith("global_step20") and lines[1].endswith("latest, resume")
    assert lines[-1] == "resume: 'latest' names 'global_step20', a complete checkpoint"
    (copy_of / "latest").unlink()
    code, out, _ = run(capsys, "ls", copy_of)
    assert out.splitlines()[-1] == (f"resume: 'latest' is missing, empty or unreadable; resuming from "
                                    f"'global_step40', the newest complete checkpoint in {copy_of}")


def test_ls_json_and_config(trained, capsys):
    code, out, _ = run(capsys, "ls", trained, "--json", "--config", REPO / "examples" / "ds_config.json")
    rows = json.loads(out)
    assert code == 0 and [row["tag"] for row in rows] == ["global_step20", "global_step30", "global_step40",
                                                          "global_step10"]
    assert all({"tag", "step", "complete", "bytes", "latest", "resume"} <= row.keys() for row in rows)
    assert [row["latest"] for row in rows] == [False, False, True, False]
    assert [row["resume"] for row in rows] == [False, False, True, False]
    assert [row["step"] for row in rows[:3]] == [20, 30, 40] and all(row["bytes"] > 0 for row in rows[:3])
    assert [row["next_to_delete"] for row in rows] == [False, False, False, True]  # keep_last 3 keeps all three
    assert (rows[3]["complete"], rows[3]["state"]) == (False, "spare (the next save writes over it)")


def test_ls_marks_leftovers(copy_of, capsys):
    (copy_of / ".global_step50.ds_fastckpt-tmp").mkdir()
    code, out, _ = run(capsys, "ls", copy_of, "--json")
    assert json.loads(out)[-1] == {**json.loads(out)[-1], "tag": "global_step50", "complete": False,
                                   "state": "interrupted save"}


def test_verify_intact(trained, capsys):
    code, out, _ = run(capsys, "verify", trained)
    assert code == 0 and "are intact" in out


@pytest.mark.parametrize("damage, message", [
    ("truncate", "bytes, the manifest says"),
    ("flip", "CRC-32C"),
    ("delete", "missing"),
    ("manifest", "manifest"),
])
def test_verify_names_the_damaged_file(copy_of, capsys, damage, message):
    victim = copy_of / "global_step30" / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x10
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        victim.unlink()
    else:
        victim = copy_of / "global_step30" / MANIFEST_NAME
        victim.write_text("not json")
    code, out, _ = run(capsys, "verify", copy_of)
    assert code == 1
    [line] = [line for line in out.splitlines() if str(victim) in line]
    assert message in line


def test_verify_unknown_tag(trained, capsys):
    code, out, _ = run(capsys, "verify", trained, "global_step99")
    assert code == 1 and "global_step99: not a ds_fastckpt checkpoint" in out


def test_verify_of_a_directory_without_checkpoints_fails(tmp_path, capsys):
    (tmp_path / "global_step1").mkdir()  # another engine's checkpoint: no manifest
    (tmp_path / "notes.txt").write_text("mine")
    code, out, _ = run(capsys, "verify", tmp_path)
    assert code == 1
    assert out.splitlines() == [f"{tmp_path} holds no ds_fastckpt checkpoint (no tag directory with {MANIFEST_NAME}): "
                                "nothing was verified"]


def test_verify_of_a_copy_says_it_is_not_ours(copy_of, capsys):
    shutil.copytree(copy_of / "global_step30", copy_of / "best_model")
    code, out, _ = run(capsys, "verify", copy_of, "best_model")
    assert code == 1 and f"{copy_of / 'best_model'}: " in out and "not ours" in out


def test_prune_dry_run_then_for_real(copy_of, capsys):
    code, out, _ = run(capsys, "prune", copy_of, "--keep-last", "1", "--dry-run")
    assert code == 0 and out.splitlines() == [f"would delete {copy_of / 'global_step20'}",
                                               f"would delete {copy_of / 'global_step30'}",
                                               f"would delete {copy_of / '.global_step10.ds_fastckpt-spare'}"]
    assert (copy_of / "global_step20").is_dir()
    (copy_of / "latest").write_text("global_step20")
    code, out, _ = run(capsys, "prune", copy_of, "--keep-last", "1")
    assert code == 0 and out.splitlines() == [f"deleted {copy_of / 'global_step30'}",
                                               f"deleted {copy_of / '.global_step10.ds_fastckpt-spare'}"]
    assert sorted(p.name for p in copy_of.iterdir() if p.is_dir()) == ["global_step20", "global_step40"]
    assert (copy_of / "zero_to_fp32.py").is_file()


@pytest.mark.parametrize("options, methods, baseline", [
    ([], ("raw O_DIRECT", "AioFileWriter", "torch.save+fsync", "dcp.save sync_files"), "torch.save+fsync"),
    (["--crc32-both", "--io-buffer", "8MiB", "--block-size", "512KiB", "--queue-depth", "4"],
     ("raw O_DIRECT", "AioFileWriter, crc32 off", "torch.save+fsync, crc32 off", "AioFileWriter, crc32 on",
      "torch.save+fsync, crc32 on", "dcp.save sync_files"), "torch.save+fsync, crc32 on"),
])
def test_bench_prints_a_table_and_plots(tmp_path, capsys, options, methods, baseline):
    plot = tmp_path / "bench.png"
    code, out, _ = run(capsys, "bench", "--dir", tmp_path, "--size", "4MiB", "--rounds", "1", "--plot", plot,
                       *options)
    assert code == 0
    cells = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    rows = {row[0]: row[2:] for row in cells if len(row) == 4 and row[0] in methods}  # name, GB/s, two ratios
    assert list(rows) == list(methods)
    assert rows["raw O_DIRECT"][0] == "1.00x" and rows[baseline][1] == "1.00x"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]


def test_bench_refuses_a_block_size_o_direct_cannot_use(tmp_path, capsys):
    code, _, err = run(capsys, "bench", "--dir", tmp_path, "--size", "4MiB", "--block-size", "1000")
    assert code == 1 and "block_size=1000 is not allowed" in err
    assert list(tmp_path.iterdir()) == []


def test_doctor(tmp_path, capsys):
    code, out, _ = run(capsys, "doctor", tmp_path)
    assert code == 0 and out.splitlines()[-1] == "all checks passed", out
    assert "O_DIRECT works in" in out and "DeepSpeed" in out
    assert os.listdir(tmp_path) == []


def test_missing_directory_is_an_error(tmp_path, capsys):
    code, _, err = run(capsys, "ls", tmp_path / "nope")
    assert code == 1 and f"{tmp_path / 'nope'}" in err


@pytest.mark.parametrize("argv", [[], ["prune", "x"], ["ls"], ["prune", "x", "--keep-last", "-1"], ["bogus"]])
def test_usage_errors_exit_2(argv):
    result = subprocess.run([sys.executable, "-m", "ds_fastckpt", *argv], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 2
    assert "usage: ds-fastckpt" in result.stderr
