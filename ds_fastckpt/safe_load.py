"""Unpickling checkpoints without running code: ``weights_only=True`` plus exactly the classes DeepSpeed stores.

DeepSpeed's own engine loads with ``weights_only=False``: a checkpoint file
replaced by a pickle whose ``__reduce__`` runs a command runs it. Checkpoint
files of ZeRO stages 1 and 2 hold ``LossScaler``, ``ZeroStageEnum`` and
``fragment_address``; stage 3 the first two; fp16 adds ``DynamicLossScaler``.
Nothing else outside torch's own safe set is let through. ``trusted_pickles``
in the config opts out, for trusted checkpoints holding other objects (e.g.
custom classes in ``client_state``); ``torch.serialization.add_safe_globals``
admits a class for everyone instead.
"""

import pickle

import torch

DEEPSPEED_CHECKPOINT_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file wants to unpickle something outside the allowlist; nothing of it was run."""


def allowed_globals():
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_CHECKPOINT_GLOBALS]


def load(source, *, path, map_location=None, trusted: bool = False):
    """``torch.load`` of ``source`` (a path or file object read from ``path``), safely unless ``trusted``.

    Raises:
        UnsafeCheckpointError: naming the file and what it asked for.
    """
    if trusted:
        return torch.load(source, map_location=map_location, weights_only=False)
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"refused to load {path}: its pickle holds something weights_only loading does not accept "
                f"({_reason(error)}), so it was not unpickled. Either the file is damaged (verify='checksum' "
                "tells), or it holds objects outside ds_fastckpt's allowlist of DeepSpeed checkpoint classes: if "
                "you trust it, set checkpoint.fast_aio.trusted_pickles=true, or admit the class with "
                "torch.serialization.add_safe_globals") from None


def _reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only message that says what was refused, e.g. the GLOBAL it names."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
    return (specific or lines or ["no reason given"])[0]
