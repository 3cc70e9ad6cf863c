"""Integrations of ds_fastckpt with training frameworks that drive DeepSpeed for you.

``huggingface``: ``last_complete_checkpoint`` and ``FastAioTrainerCallback``
for the Hugging Face ``Trainer``; ``accelerate_state``: ``Accelerator.load_state``;
``pending_checkpoints``: ``PendingCheckpointError``, raised for loading a
checkpoint an async save left pending. ``wiring.install()`` (called when
``ds_fastckpt`` is imported) applies them to the Trainer and accelerate.
Importing this package never imports ``transformers``;
``FastAioTrainerCallback`` does, on first use.
"""

from typing import Any

from ds_fastckpt.integrations.huggingface import last_complete_checkpoint
from ds_fastckpt.integrations.pending_checkpoints import PendingCheckpointError

__all__ = ["FastAioTrainerCallback", "PendingCheckpointError", "last_complete_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "FastAioTrainerCallback":
        from ds_fastckpt.integrations import huggingface

        return huggingface.FastAioTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
