"""The op builds with DeepSpeed's builder, is cached, and its sources ship with the package."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from deepspeed.ops.op_builder.builder import CUDAOpBuilder

from ds_fastckpt import FastCkptBuilder
from ds_fastckpt.native.op_builder import csrc_dir

REPO = Path(__file__).resolve().parents[2]


def test_builder_is_a_deepspeed_builder_and_compatible_here():
    builder = FastCkptBuilder()
    assert isinstance(builder, CUDAOpBuilder)
    assert builder.BUILD_VAR == "DS_BUILD_FASTCKPT"
    assert builder.is_compatible()
    assert all(Path(source).is_absolute() and Path(source).is_file() for source in builder.sources())
    assert "-O3" in builder.cxx_args()
    assert "-laio" in builder.extra_ldflags()


def test_compatible_when_stderr_has_no_descriptor(capsys):
    assert FastCkptBuilder().is_compatible()


def test_load_twice_returns_the_cached_module():
    first = FastCkptBuilder().load()
    second = FastCkptBuilder().load()
    assert first is second
    assert hasattr(first, "AioWriter")


def test_sources_are_the_checkout_csrc():
    assert csrc_dir() == REPO / "csrc"


def test_wheel_ships_csrc_and_prebuilds_with_build_var(tmp_path):
    # Build from a copy, so nothing left in the checkout's build/ is reused.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                                "__pycache__", "*.so"))
    env = dict(os.environ, DS_BUILD_FASTCKPT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)],
                   check=True, env=env, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("ds_fastckpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {name for name in names if name.startswith("ds_fastckpt/csrc/")}
    assert {f"ds_fastckpt/csrc/{path.name}" for path in (REPO / "csrc").iterdir()} <= shipped
    assert any(name.startswith("ds_fastckpt/ds_fastckpt_op") and name.endswith(".so") for name in names)
