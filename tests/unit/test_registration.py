"""Importing ds_fastckpt hooks DeepSpeed once, however often it is installed."""

import deepspeed.runtime.engine as ds_engine_module
from deepspeed.runtime.engine import DeepSpeedEngine

from ds_fastckpt.engine import registration


def test_install_is_idempotent():
    hooks = (ds_engine_module.create_checkpoint_engine, DeepSpeedEngine.save_checkpoint,
             DeepSpeedEngine.load_checkpoint, DeepSpeedEngine.destroy)
    registration.install()
    registration.install()
    assert (ds_engine_module.create_checkpoint_engine, DeepSpeedEngine.save_checkpoint,
            DeepSpeedEngine.load_checkpoint, DeepSpeedEngine.destroy) == hooks
    assert all(getattr(hook, "_ds_fastckpt_hook", False) for hook in hooks)
