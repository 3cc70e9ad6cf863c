"""examples/train.py trains, saves with rotation, and resumes where it stopped."""

import importlib.util
from pathlib import Path

import pytest

from ds_fastckpt.format.names import MANIFEST_NAME
from tests.ds_helpers import single_process_env

pytestmark = pytest.mark.usefixtures("no_fd_leaks")  # the example saves through the op

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train.py"


@pytest.fixture(scope="module")
def train_module():
    single_process_env()
    spec = importlib.util.spec_from_file_location("example_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trains_saves_rotates_and_resumes(tmp_path, train_module):
    save_dir = tmp_path / "ckpts"
    first = train_module.main(["--save-dir", str(save_dir), "--steps", "40", "--save-every", "10", "--width", "64"])
    assert first["resumed_from"] is None
    assert [save["tag"] for save in first["saves"]] == [f"global_step{n}" for n in (10, 20, 30, 40)]
    assert all(save["bytes"] > 0 and save["gbps"] > 0 for save in first["saves"])
    assert first["kept"] == ["global_step20", "global_step30", "global_step40"]  # keep_last 3 in ds_config.json
    assert all((save_dir / tag / MANIFEST_NAME).is_file() for tag in first["kept"])

    second = train_module.main(["--save-dir", str(save_dir), "--steps", "50", "--save-every", "10", "--width", "64",
                                "--compare-default"])
    assert second["resumed_from"] == 40
    assert [save["tag"] for save in second["saves"]] == ["global_step50"]
    assert second["saves"][0]["default_engine_seconds"] > 0
    assert second["kept"] == ["global_step30", "global_step40", "global_step50"]
