"""Wires the Hugging Face Trainer and accelerate to async fast_aio checkpoints when ``ds_fastckpt`` is imported.

``install()`` patches each target module now if it is imported already, and
otherwise when it is: a ``sys.meta_path`` finder wraps the loader of the
targets (and nothing else) so that the patch runs right after the module's
own code, before any other module imports names from it. Neither
``transformers`` nor ``accelerate`` is ever imported here. Every patch is
idempotent and acts only on fast_aio engines or folders holding our pending
directories (``huggingface``, ``accelerate_state``); a patch that fails is
logged and leaves the module as it was.
"""

import importlib.abc
import logging
import sys
import threading
from typing import Callable, Dict

from ds_fastckpt.integrations import accelerate_state, huggingface

logger = logging.getLogger(__name__)

__all__ = ["install"]

_PATCHES: Dict[str, Callable] = {
    "transformers.trainer_utils": huggingface.patch_trainer_utils,
    "transformers.integrations.deepspeed": huggingface.patch_deepspeed_integration,
    "transformers.trainer": huggingface.patch_trainer,
    "accelerate.accelerator": accelerate_state.patch_accelerator,
}


def _apply(name: str, module) -> None:
    try:
        _PATCHES[name](module)
    except Exception:  # never break the user's import of transformers or accelerate
        logger.warning("ds_fastckpt could not wire %s; async checkpoints still save and load, but see the README "
                       "for what to do by hand", name, exc_info=True)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then the patch; everything else is the wrapped loader's."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _apply(self._name, module)

    def __getattr__(self, attribute):  # get_source, get_filename, is_package, get_resource_reader...
        return getattr(self._loader, attribute)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders, and wraps the loader of a target module."""

    def __init__(self):
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES or getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.active = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, fullname)
        return spec


def install() -> None:
    """Patches the target modules imported already and hooks the import of the others; idempotent."""
    if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    for name in _PATCHES:
        module = sys.modules.get(name)
        if module is not None:
            _apply(name, module)
