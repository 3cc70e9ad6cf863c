"""Builds the native writer op with DeepSpeed's op builder.

``FastCkptBuilder().load()`` returns the op: the copy prebuilt by
``DS_BUILD_FASTCKPT=1 pip install --no-build-isolation .`` when there is one,
otherwise a JIT build cached under ``~/.cache/torch_extensions`` like any
DeepSpeed op.
"""

import importlib
import io
import logging
import sys
from pathlib import Path

from deepspeed.ops.op_builder.builder import CUDAOpBuilder, OpBuilder

logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # ds_fastckpt/, two levels above this file

_SOURCES = ("unique_fd.cpp", "fault_injection.cpp", "direct_io.cpp", "crc32c.cpp", "crc32c_portable.cpp",
            "crc32c_sse42.cpp", "crc32c_armv8.cpp", "aio_queue.cpp", "aio_writer.cpp", "aio_reader.cpp",
            "fastckpt_binding.cpp")


def csrc_dir() -> Path:
    """Where the C++ sources are: inside the installed package, or the source checkout's ``csrc/``."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / _SOURCES[-1]).is_file():
            return candidate
    raise FileNotFoundError(f"ds_fastckpt C++ sources not found in {_PACKAGE_DIR / 'csrc'} "
                            f"or {_PACKAGE_DIR.parent / 'csrc'}; reinstall ds_fastckpt")


class FastCkptBuilder(CUDAOpBuilder):
    """DeepSpeed op builder for ds_fastckpt's libaio writer.

    It subclasses ``CUDAOpBuilder`` because DeepSpeed's own ``AsyncIOBuilder``
    does: without a CUDA torch it compiles a CPU-only extension, and the source
    has no CUDA code either way. Source paths are absolute so DeepSpeed does
    not look for them inside its own tree.
    """

    BUILD_VAR = "DS_BUILD_FASTCKPT"
    NAME = "ds_fastckpt_op"

    def __init__(self):
        super().__init__(name=self.NAME)

    def absolute_name(self):
        return f"ds_fastckpt.{self.NAME}"

    def sources(self):
        return [str(csrc_dir() / name) for name in _SOURCES]

    def include_paths(self):
        return [str(csrc_dir())]

    def cxx_args(self):
        # DeepSpeed's -O3 and the C++ standard the installed torch needs; no -g,
        # which costs build time and buys nothing in a release op.
        inherited = [arg for arg in super().cxx_args() if arg != "-g"]
        return [*inherited, "-Wall", "-fvisibility=hidden"]

    def nvcc_args(self):
        return []

    def extra_ldflags(self):
        return ["-laio"]

    def is_compatible(self, verbose=False):
        if not self._links_libaio(verbose):
            # jit_load() puts error_log into the RuntimeError it raises.
            self.error_log = (f"{self.NAME} needs libaio's headers and library: install Debian/Ubuntu "
                              "'libaio-dev' (apt-get install libaio-dev) or Fedora/RHEL 'libaio-devel'; "
                              "for a libaio outside the default paths set CFLAGS and LDFLAGS.")
            if verbose:
                logger.warning(self.error_log)
            return False
        return super().is_compatible(verbose)

    def _links_libaio(self, verbose: bool) -> bool:
        # DeepSpeed's has_function silences the compiler by redirecting sys.stderr's file descriptor and
        # reports False when sys.stderr has none (pytest capture, notebooks); give it the real stderr.
        stderr = sys.stderr
        try:
            stderr.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):
            if sys.__stderr__ is None:
                verbose = True  # no descriptor to redirect at all: let the probe print instead
            else:
                sys.stderr = sys.__stderr__
        try:
            return self.has_function("io_submit", ("aio", ), verbose=verbose)
        finally:
            sys.stderr = stderr

    def load(self, verbose=False):
        """Returns the op module: cached, prebuilt, or JIT-built, in that order."""
        cached = OpBuilder._loaded_ops.get(self.name)
        if cached is not None:
            return cached
        try:
            module = importlib.import_module(self.absolute_name())
        except ImportError:
            return self.jit_load(verbose)
        OpBuilder._loaded_ops[self.name] = module
        return module

