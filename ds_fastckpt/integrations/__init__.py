"""Integrations of ds_fastckpt with training frameworks that drive DeepSpeed for you.

``huggingface``: ``last_complete_checkpoint`` and ``FastAioTrainerCallback``
for the Hugging Face ``Trainer``. Importing this package never imports
``transformers``; ``FastAioTrainerCallback`` does, on first use.
"""

from typing import Any

from ds_fastckpt.integrations.huggingface import last_complete_checkpoint

__all__ = ["FastAioTrainerCallback", "last_complete_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "FastAioTrainerCallback":
        from ds_fastckpt.integrations import huggingface

        return huggingface.FastAioTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
